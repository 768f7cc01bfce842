// Model output as markdown, made safe: the answer is untrusted text.
//
// 1. marked parses it; raw HTML in it (block or inline) is rendered as escaped text, not markup, so a
//    `<script>` or `<img onerror>` the model wrote is shown, not run.
// 2. Images are never loaded: a markdown image becomes a text note with its address (the page's
//    img-src allows only this origin, and a blocked load would still be a request attempt).
// 3. DOMPurify then sanitises the HTML marked produced (HTML profile only: no SVG or MathML, no style
//    attributes, no forms), and links get rel="noopener noreferrer".
// 4. Code blocks with a known language are highlighted by highlight.js (which escapes what it emits).
"use strict";
(function () {
  function escape(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  const md = new marked.Marked({
    gfm: true,
    breaks: false,
    renderer: {
      html(token) { return escape(token.text); },
      image(token) {
        return '<span class="img-ref">[image: ' + escape(token.text || "") + "] " + escape(token.href || "") + "</span>";
      },
      code(token) {
        const lang = (token.lang || "").trim().split(/\s+/)[0].toLowerCase();
        let body = escape(token.text);
        if (lang && hljs.getLanguage(lang)) {
          body = hljs.highlight(token.text, { language: lang, ignoreIllegals: true }).value;
        }
        const cls = lang ? ' class="hljs language-' + escape(lang) + '"' : ' class="hljs"';
        return "<pre><code" + cls + ">" + body + "</code></pre>\n";
      },
    },
  });

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("rel", "noopener noreferrer");
      node.setAttribute("target", "_blank");
    }
  });
  const PURIFY = {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "video", "audio", "source", "picture"],
    FORBID_ATTR: ["style", "srcset", "src", "action", "formaction", "background", "poster"],
  };

  // Markdown text -> a DocumentFragment of sanitised nodes (never an HTML string into the page).
  function render(text) {
    const html = md.parse(text);
    return DOMPurify.sanitize(html, Object.assign({ RETURN_DOM_FRAGMENT: true }, PURIFY));
  }

  window.r1markdown = { render };
})();
