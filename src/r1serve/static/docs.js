// Starts Swagger UI on /docs. A file rather than the inline script FastAPI's page uses: the console's
// Content-Security-Policy allows scripts from this origin only.
"use strict";
(function () {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    dom_id: "#swagger-ui",
    deepLinking: true,
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis],
    // Swagger's validator badge asks a remote service about the spec: nothing leaves this origin.
    validatorUrl: null,
  });
})();
