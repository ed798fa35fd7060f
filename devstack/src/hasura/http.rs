//! `POST /v1/graphql` with Hasura's envelope: HTTP 200 for every GraphQL-level error, and
//! `GET /healthz`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use async_graphql::parser::types::OperationType;

use super::App;
use super::auth::Identity;
use super::error::{GqlError, code};
use super::exec::{self, RawRequest};

pub(crate) async fn graphql(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    // Run the request in its own task, so that a client hanging up mid-mutation cannot stop
    // it between two statements of its transaction.
    let tracker = app.sockets.tracker.clone();
    let task = tracker.spawn(async move { handle(&app, &headers, &body).await });
    let body = match task.await {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, "GraphQL request task failed");
            GqlError::unexpected("internal error").to_response_json()
        }
    };
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

pub(crate) async fn healthz() -> &'static str {
    "OK"
}

async fn handle(app: &App, headers: &HeaderMap, body: &[u8]) -> String {
    let names: Vec<String> = headers.keys().map(|n| n.as_str().to_owned()).collect();
    let lookup = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let identity = match app.engine.authenticate(&lookup, &names).await {
        Ok(identity) => identity,
        Err(error) => return error.to_response_json(),
    };
    let json: serde_json::Value = match serde_json::from_slice(body) {
        Ok(json) => json,
        Err(e) => {
            return GqlError::new(code::INVALID_JSON, "$", format!("Error in $: {e}"))
                .to_response_json();
        }
    };
    match json {
        // A batch: the answers, in order.
        serde_json::Value::Array(requests) => {
            let mut bodies = Vec::with_capacity(requests.len());
            for request in &requests {
                bodies.push(handle_one(app, &identity, request).await);
            }
            format!("[{}]", bodies.join(","))
        }
        request => handle_one(app, &identity, &request).await,
    }
}

async fn handle_one(app: &App, identity: &Identity, request: &serde_json::Value) -> String {
    let prepared = match RawRequest::from_json(request).and_then(exec::prepare) {
        Ok(prepared) => prepared,
        Err(error) => return error.to_response_json(),
    };
    if prepared.kind == OperationType::Subscription {
        return GqlError::new(
            code::UNEXPECTED_PAYLOAD,
            "$",
            "subscriptions are not supported over HTTP, use websockets instead",
        )
        .to_response_json();
    }
    let schema = app.engine.schema_for(&identity.vars.role);
    exec::execute(schema, &app.engine.pool, &prepared, &identity.vars)
        .await
        .into_http_body()
}
