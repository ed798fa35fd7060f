//! SDK errors as [`HostError`]s: by EC2 error code first and HTTP status second, so
//! [`HostError::is_retryable`] decides what is retried.

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::hosts::HostError;

const THROTTLING_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "PriorityRequestLimitExceeded",
    "BandwidthLimitExceeded",
    "SlowDown",
];
/// Capacity that may come back (another AZ, a few minutes later). Account quotas
/// (`InstanceLimitExceeded`, `VcpuLimitExceeded`) are not here: waiting does not raise them.
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientCapacity",
    "InsufficientReservedInstanceCapacity",
];
const SERVER_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
];
const NOT_FOUND_CODES: &[&str] = &["InvalidInstanceID.NotFound"];

/// Maps an SDK error to a [`HostError`], by EC2 error code first and HTTP status second.
pub(super) fn classify<E>(operation: &'static str, error: SdkError<E>) -> HostError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = error.raw_response().map(|r| r.status().as_u16());
    let code = error.code().map(str::to_owned);
    let message = match &code {
        Some(code) => format!("{code}: {}", error.message().unwrap_or("(no message)")),
        None => DisplayErrorContext(&error).to_string(),
    };
    match &error {
        SdkError::TimeoutError(_) => return timeout_error(operation, message),
        SdkError::DispatchFailure(failure) => {
            return if failure.is_timeout() {
                timeout_error(operation, message)
            } else if failure.is_user() {
                invalid(operation, message)
            } else {
                network(operation, message)
            };
        }
        SdkError::ConstructionFailure(_) => return invalid(operation, message),
        _ => {}
    }
    let code = code.as_deref().unwrap_or("");
    if THROTTLING_CODES.contains(&code) || status == Some(429) {
        throttled(operation, message)
    } else if CAPACITY_CODES.contains(&code) {
        capacity(operation, message)
    } else if NOT_FOUND_CODES.contains(&code) {
        not_found(operation, message)
    } else if SERVER_CODES.contains(&code) || status.is_none_or(|s| s >= 500) {
        server(operation, message)
    } else {
        invalid(operation, message)
    }
}

pub(super) fn is_not_found(error: &HostError) -> bool {
    matches!(error, HostError::NotFound { .. })
}

fn throttled(operation: &'static str, message: String) -> HostError {
    HostError::Throttled { operation, message }
}
fn capacity(operation: &'static str, message: String) -> HostError {
    HostError::Capacity { operation, message }
}
fn server(operation: &'static str, message: String) -> HostError {
    HostError::Server { operation, message }
}
pub(super) fn invalid(operation: &'static str, message: String) -> HostError {
    HostError::Invalid { operation, message }
}
fn not_found(operation: &'static str, message: String) -> HostError {
    HostError::NotFound { operation, message }
}
pub(super) fn timeout_error(operation: &'static str, message: String) -> HostError {
    HostError::Timeout { operation, message }
}
fn network(operation: &'static str, message: String) -> HostError {
    HostError::Network { operation, message }
}
