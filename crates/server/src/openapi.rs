//! The OpenAPI 3.1 document, generated from the handlers' annotations and
//! the wire types (utoipa), and a docs page that renders it.

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln",
        description = "A self-hosted code interpreter speaking the Together Code Interpreter API. \
            Every `/v1/tci/...` path is also served as `/tci/...`. MCP (streamable HTTP) is served at \
            `/mcp` with the same keys; it is described by the MCP protocol, not here. The `admin` endpoints \
            need an admin key (`kiln keys create --admin`, the first configured key, or the generated one) \
            and answer `403 forbidden` to any other.",
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
        crate::console::languages,
        crate::console::status,
        crate::admin::list,
        crate::admin::create,
        crate::admin::revoke,
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

/// A page rendering this document (Swagger UI, embedded in the binary: no
/// CDN, so it works on a machine without internet access).
#[utoipa::path(get, path = "/docs", tag = "operations", responses(
    (status = 200, description = "HTML", content_type = "text/html")
))]
pub(crate) async fn docs(headers: HeaderMap) -> Response {
    kiln_web::page(kiln_web::Page::Docs, &headers)
}
