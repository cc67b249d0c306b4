//! The router: which handler serves which path, and the layers around them.
//! It only composes; the handlers live in their own modules.

use crate::require::require_key;
use crate::state::AppState;
use crate::{admin, batch, execute, files, ops, sessions};
use axum::routing::{delete, get, post};
use axum::Router;

pub(crate) fn router(state: AppState) -> Router {
    // Every API route under both prefixes: `/tci` (curl examples, the 1.x
    // Python client) and `/v1/tci` (the 2.x Python and npm clients).
    let mut api = Router::new();
    for prefix in ["/tci", "/v1/tci"] {
        api = api
            .route(&format!("{prefix}/execute"), post(execute::execute))
            .route(&format!("{prefix}/batch"), post(batch::batch))
            .route(&format!("{prefix}/sessions"), get(sessions::list))
            .route(&format!("{prefix}/sessions/{{id}}"), get(sessions::get).delete(sessions::delete))
            .route(&format!("{prefix}/sessions/{{id}}/files"), get(files::list).post(files::upload))
            .route(&format!("{prefix}/sessions/{{id}}/files/{{*path}}"), get(files::download))
            .route(&format!("{prefix}/usage"), get(sessions::usage));
    }
    // Authenticated first, then served here or forwarded to the session's
    // node (in a cluster).
    let api = api.route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::cluster::route));
    // MCP tools on a cluster node call these same routes in-process (the
    // caller set by the MCP request's authentication), so that they reach
    // sessions wherever they are; a single node calls its manager.
    let tools = match state.cluster {
        Some(_) => kiln_mcp::Backend::Routed(kiln_mcp::Api::new(api.clone().with_state(state.clone()))),
        None => kiln_mcp::Backend::Local(state.manager.clone()),
    };
    let api = api.route_layer(axum::middleware::from_fn_with_state(state.clone(), require_key));
    // Key management, for admin keys only (the key is checked first).
    let admin = Router::new()
        .route("/v1/admin/keys", get(admin::list).post(admin::create))
        .route("/v1/admin/keys/{id}", delete(admin::revoke))
        .route("/v1/admin/nodes", get(admin::nodes))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admin::require_admin))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_key));
    // MCP over streamable HTTP, with the same keys: tools act as the caller.
    let mcp = Router::new()
        .nest_service("/mcp", kiln_mcp::http_service(tools, state.cluster.is_some()))
        .layer(axum::middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(api)
        .merge(admin)
        .merge(mcp)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(crate::openapi::json))
        .route("/docs", get(crate::openapi::docs))
        .route("/tci/languages", get(crate::console::languages))
        .route("/v1/tci/languages", get(crate::console::languages))
        .route("/v1/status", get(crate::console::status))
        // The playground (`/`), the console and their assets.
        .merge(kiln_web::router())
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        // Bodies are read (and limited) by the handlers' extractor, so that
        // an oversized body gets the API's JSON error, not a plain-text one.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(state.clone(), ops::count_errors))
        // A request id per request (kept when the client sends one), in
        // every log line of the request and in the response.
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(tower_http::request_id::MakeRequestUuid))
        .with_state(state)
}
