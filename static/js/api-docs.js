// The API's docs page: Swagger UI on our OpenAPI document; "Try it out" uses the session
// (with the CSRF token for writes) or a token given with "Authorize".
(function () {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.schemaUrl,
    dom_id: "#swagger-ui",
    deepLinking: true,
    requestInterceptor: function (request) {
      if (!request.headers.Authorization && request.method !== "GET") {
        request.headers["X-CSRFToken"] = root.dataset.csrfToken;
      }
      return request;
    },
  });
})();
