//! The OpenAPI 3.1 document, generated from the handlers' annotations and
//! the wire types (utoipa), and a docs page that renders it.

use crate::state::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;
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
        crate::batch::batch,
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
        crate::admin::nodes,
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

/// The document, without the server's own limits.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as this server serves it: every constraint the server
/// enforces is stated, so that a request the schema allows is one the
/// server accepts (schemathesis checks both ways). What the annotations
/// cannot say is set here: the path rules (one pattern, shared with the
/// code that enforces it), this server's largest `timeout`, and the shape of
/// a streamed execution's events.
pub fn document_for(
    max_timeout: std::time::Duration,
    network: kiln_protocol::NetworkPolicy,
    max_batch_items: usize,
    languages: &[kiln_protocol::Language],
) -> serde_json::Value {
    let mut doc = serde_json::to_value(document()).unwrap_or_default();
    if let Some(paths) = doc["paths"].as_object_mut() {
        for op in paths.values_mut().filter_map(|p| p.as_object_mut()).flat_map(|p| p.values_mut()) {
            // `get_mut`, not indexing: indexing a missing key would add it.
            for param in op.get_mut("parameters").and_then(|p| p.as_array_mut()).into_iter().flatten() {
                if param["name"] == "path" {
                    param["schema"]["pattern"] = json!(kiln_protocol::PATH_PATTERN);
                }
            }
        }
    }
    doc["components"]["schemas"]["ExecuteRequest"]["properties"]["timeout"]["maximum"] =
        json!(max_timeout.as_secs_f64());
    doc["components"]["schemas"]["BatchRequest"]["properties"]["items"]["maxItems"] = json!(max_batch_items);
    // A key may only narrow the server's network policy: the policies it
    // may ask for are those within this server's `--network`.
    let within: Vec<&str> = kiln_protocol::NetworkPolicy::ALL
        .into_iter()
        .filter(|p| p.within(network).is_ok())
        .map(|p| p.as_str())
        .collect();
    doc["components"]["schemas"]["CreateKey"]["properties"]["network"] = json!({
        "description": format!(
            "Its sessions' network policy (default: the server's); never wider than this server's `--network` ({network})"
        ),
        "oneOf": [{"type": "null"}, {"type": "string", "enum": within}],
    });
    for field in ["timeout", "tests_timeout"] {
        doc["components"]["schemas"]["BatchItem"]["properties"][field]["maximum"] = json!(max_timeout.as_secs_f64());
    }
    // A test is a program run or an assertion, never both (a field that is
    // null counts as absent, as everywhere in the API).
    let string = json!({"type": "string"});
    let absent = json!({"type": "null"});
    doc["components"]["schemas"]["TestCase"]["oneOf"] = json!([
        {"title": "program", "required": ["stdin", "expected_stdout"],
         "properties": {"stdin": string, "expected_stdout": string, "code": absent}},
        {"title": "assertion", "required": ["code"],
         "properties": {"code": string, "stdin": absent, "expected_stdout": absent}},
    ]);
    // An assertion test runs in the item's Python namespace: an item with
    // one is a Python item (absent means python), so the document says so
    // instead of letting a schema-valid batch be refused for it. Program
    // tests run in every language.
    let program = json!({"required": ["stdin", "expected_stdout"], "properties": {"code": absent}});
    doc["components"]["schemas"]["BatchItem"]["anyOf"] = json!([
        {"title": "programs only", "properties": {"tests": {"oneOf": [absent, {"type": "array", "items": program}]}}},
        {"title": "python", "properties": {"language": {"oneOf": [absent, {"type": "string", "enum": ["python"]}]}}},
    ]);
    // `language` takes exactly what this server runs (its runtime profile's
    // languages), so a schema-valid request is never refused for it.
    if !languages.is_empty() {
        let names: Vec<&str> = languages.iter().map(|l| l.as_str()).collect();
        doc["components"]["schemas"]["Language"]["enum"] = json!(names);
    }
    let events = json!({
        "type": "object",
        "description": "One Server-Sent Event; `data` is JSON text: {session_id} for `session`, an output \
            ({type, data}, as in `outputs`) for the output events, {wait} for `clear_output`, the complete \
            execute envelope for `done`, an error envelope for `failed`.",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": [
                "session", "stdout", "stderr", "display_data", "execute_result", "error", "clear_output",
                "done", "failed",
            ]},
            "data": {"type": "string", "contentMediaType": "application/json"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
    });
    doc["paths"]["/v1/tci/execute"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"] = events;
    // What an upload wrote can be downloaded: a link for clients and for
    // stateful testers (schemathesis), which otherwise only guess paths.
    doc["paths"]["/v1/tci/sessions/{id}/files"]["post"]["responses"]["200"]["links"] = json!({
        "DownloadFile": {
            "operationId": "download_file",
            "parameters": {"id": "$request.path.id", "path": "$response.body#/data/written/0"},
            "description": "The first file the upload wrote",
        },
    });
    doc
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi_document", tag = "operations", responses(
    (status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")
))]
pub(crate) async fn json(State(state): State<AppState>) -> Response {
    let m = &state.manager;
    let doc = document_for(m.max_exec_timeout(), m.network(), m.max_batch_items(), &m.languages());
    ([(axum::http::header::CONTENT_TYPE, "application/json")], serde_json::to_string_pretty(&doc).unwrap_or_default())
        .into_response()
}

/// A page rendering this document (Swagger UI, embedded in the binary: no
/// CDN, so it works on a machine without internet access).
#[utoipa::path(get, path = "/docs", operation_id = "docs_page", tag = "operations", responses(
    (status = 200, description = "HTML", content_type = "text/html")
))]
pub(crate) async fn docs(headers: HeaderMap) -> Response {
    kiln_web::page(kiln_web::Page::Docs, &headers)
}
