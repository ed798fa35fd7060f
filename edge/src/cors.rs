//! CORS at the JSON edges. `PUT /json_transport` is answered by the host and, through the
//! scaling service, by the forwarder; `POST /mandelbox/assign` by the scaling service. A browser
//! sees the same policy from all three. `*` as in the later original: the endpoints take bearer
//! tokens, never cookies, so any origin may call them with a token it holds.

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

pub const ALLOW_ORIGIN: &str = "*";
pub const ALLOW_METHODS: &str = "PUT, OPTIONS";
/// What `OPTIONS /mandelbox/assign` allows.
pub const ASSIGN_ALLOW_METHODS: &str = "POST, OPTIONS";
pub const ALLOW_HEADERS: &str = "authorization, content-type";
/// Browsers may cache a preflight answer this long (seconds).
pub const MAX_AGE: &str = "600";

/// Adds the origin header every answer carries.
pub fn allow_origin(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static(ALLOW_ORIGIN),
    );
}

/// The answer to `OPTIONS /json_transport`: 204 with what a browser may send.
pub fn preflight<B: Default>() -> Response<B> {
    preflight_for(ALLOW_METHODS)
}

/// A preflight's answer for a route that takes `methods`.
pub fn preflight_for<B: Default>(methods: &'static str) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(MAX_AGE),
    );
    allow_origin(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preflight_names_methods_headers_age_and_origin() {
        let response: Response<()> = preflight();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let headers = response.headers();
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_METHODS], ALLOW_METHODS);
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_HEADERS], ALLOW_HEADERS);
        assert_eq!(headers[header::ACCESS_CONTROL_MAX_AGE], MAX_AGE);
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], ALLOW_ORIGIN);
    }
}
