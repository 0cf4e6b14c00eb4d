// Starts Swagger UI on /docs (lungcad.web.routes.api.api_docs) with the app's own OpenAPI schema.
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
