// Starts Swagger UI on /docs. No inline script (the page's CSP allows only Keel's own files): the spec's
// address comes from the data-url attribute and is fetched with the page's own credentials.
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.url,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
