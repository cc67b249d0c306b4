//! The OpenAPI 3.1 document, generated from the handlers' annotations and
//! the wire types (utoipa), and a docs page that renders it.

use axum::response::{Html, IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln",
        description = "A self-hosted code interpreter speaking the Together Code Interpreter API. \
            Every `/v1/tci/...` path is also served as `/tci/...`. MCP (streamable HTTP) is served at \
            `/mcp` with the same keys; it is described by the MCP protocol, not here.",
    ),
    paths(
        crate::execute::execute,
        crate::sessions::list,
        crate::sessions::get,
        crate::sessions::delete,
        crate::files::list,
        crate::files::download,
        crate::files::upload,
        crate::sessions::usage,
        crate::ops::healthz,
        crate::ops::readyz,
        crate::ops::metrics,
        json,
        docs,
    ),
    modifiers(&Bearer),
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("A kiln API key")).build(),
            ),
        );
    }
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses(
    (status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")
))]
pub(crate) async fn json() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], document().to_pretty_json().unwrap_or_default())
        .into_response()
}

/// A page rendering this document.
#[utoipa::path(get, path = "/docs", tag = "operations", responses(
    (status = 200, description = "HTML", content_type = "text/html")
))]
pub(crate) async fn docs() -> Html<&'static str> {
    Html(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>kiln API</title></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="https://cdn.redoc.ly/redoc/latest/bundles/redoc.standalone.js"></script>
<noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>"#,
    )
}
