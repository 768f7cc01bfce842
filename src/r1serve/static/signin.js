// Sign-in: the key goes to the server once, as a bearer header, and comes back as a session cookie the
// page cannot read. The key's input is cleared straight after.
"use strict";
(function () {
  const form = document.getElementById("signin");
  const input = document.getElementById("signin-key");
  const error = document.getElementById("signin-error");
  r1.session.then((s) => {
    if (s.signed_in || s.open) location.replace("/");
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const key = input.value.trim();
    if (!key) return;
    try {
      const response = await r1.api("/console/session", {
        method: "POST", headers: { Authorization: "Bearer " + key },
      });
      if (!response.ok) throw new Error(await r1.errorText(response));
      input.value = "";
      location.assign("/");
    } catch (e) {
      error.textContent = e.message;
      input.focus();
    }
  });
  input.focus();
})();
