//! The client and its steps: token, assign, json_transport, connect, and the whole session.

use edge::error_chain;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::http::{checked_base_url, pinned_tls_config, read_body, refusal, request_error};
use super::report::{SessionFailure, SessionReport, Timings, quote};
use super::{
    ASSIGN_RETRY_BASE, ASSIGN_RETRY_CAP, ASSIGN_RETRY_JITTER, AccessToken, AssignRequest,
    Assignment, ClientError, ClientOptions, JsonTransportAnswer, MAX_FIRST_LINE_BYTES,
    MAX_QUOTED_BODY, SESSION_PORT, SessionOptions, Step,
};

/// The scaling service answers `429 RATE_LIMITED` with `Retry-After: 1`.
const RATE_LIMITED_PAUSE: Duration = Duration::from_secs(1);

/// An open connection to the mandelbox's session port.
#[derive(Debug)]
pub struct Connection {
    pub addr: SocketAddr,
    /// The mandelbox's first line, without the line end.
    pub first_line: String,
    /// The TCP handshake.
    pub connect_time: Duration,
    /// From the start of the connection to the first byte of the mandelbox's answer.
    pub time_to_first_byte: Duration,
    /// From the start of the connection to the end of the first line.
    pub first_line_time: Duration,
    stream: BufReader<TcpStream>,
}

impl Connection {
    /// The first line as JSON, when it is.
    pub fn first_line_json(&self) -> Option<Value> {
        serde_json::from_str(&self.first_line).ok()
    }

    /// Keeps the connection open for `duration`, discarding what the mandelbox sends; fails if
    /// the mandelbox closes it first.
    pub async fn hold(&mut self, duration: Duration) -> Result<(), ClientError> {
        let started = Instant::now();
        let addr = self.addr;
        let drain = async {
            let mut buf = [0u8; 4096];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) => {
                        return ClientError::ClosedByPeer {
                            step: Step::Hold,
                            addr,
                            after: started.elapsed(),
                        };
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return ClientError::Io {
                            step: Step::Hold,
                            addr,
                            detail: e.to_string(),
                        };
                    }
                }
            }
        };
        match tokio::time::timeout(duration, drain).await {
            Ok(error) => Err(error),
            Err(_) => Ok(()),
        }
    }

    /// Leaves: shuts the connection down (the mandelbox ends the session).
    pub async fn close(mut self) {
        // The mandelbox may be gone already; leaving is all that is asked.
        let _ = self.stream.get_mut().shutdown().await;
    }
}

/// The client. Cheap to clone; one per process is enough.
#[derive(Debug, Clone)]
pub struct Client {
    options: ClientOptions,
    http: reqwest::Client,
}

impl Client {
    pub fn new(mut options: ClientOptions) -> Result<Self, ClientError> {
        options.scaling_url = checked_base_url("scaling service URL", &options.scaling_url)?;
        options.control_url = options
            .control_url
            .as_deref()
            .map(|u| checked_base_url("devstack control URL", u))
            .transpose()?;
        options.regions.retain(|r| !r.trim().is_empty());
        if options.regions.is_empty() {
            return Err(ClientError::Invalid {
                what: "regions",
                reason: "at least one expected".to_owned(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("whist-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Tls(error_chain(&e)))?;
        Ok(Self { options, http })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Step 1: a token for `user_id` from devstack's fake Auth0.
    pub async fn token(&self, user_id: &str) -> Result<AccessToken, ClientError> {
        let control = self
            .options
            .control_url
            .as_deref()
            .ok_or(ClientError::NoControlUrl)?;
        let url = format!("{control}/token");
        let response = self
            .http
            .post(&url)
            .json(&json!({ "user_id": user_id }))
            .send()
            .await
            .map_err(|e| request_error(Step::Token, &url, e))?;
        let (status, body) = read_body(Step::Token, &url, response).await?;
        if !status.is_success() {
            return Err(refusal(Step::Token, &url, status, &body));
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            step: Step::Token,
            url: url.clone(),
            detail: format!("no access_token: {e}"),
        })?;
        AccessToken::new(answer.access_token).map_err(|e| ClientError::BadAnswer {
            step: Step::Token,
            url,
            detail: e.to_string(),
        })
    }

    /// A request for a new session with the client's regions and commit.
    pub fn assign_request(&self, user_email: Option<String>) -> AssignRequest {
        AssignRequest::new(
            self.options.regions.clone(),
            self.options.commit.clone(),
            user_email,
        )
    }

    /// Step 2, one attempt: `POST /mandelbox/assign`.
    pub async fn assign(
        &self,
        token: &AccessToken,
        request: &AssignRequest,
    ) -> Result<Assignment, ClientError> {
        let url = format!("{}/mandelbox/assign", self.options.scaling_url);
        let response = self
            .http
            .post(&url)
            .bearer_auth(token.expose())
            .json(request)
            .send()
            .await
            .map_err(|e| request_error(Step::Assign, &url, e))?;
        let (status, body) = read_body(Step::Assign, &url, response).await?;
        if status != reqwest::StatusCode::OK {
            return Err(refusal(Step::Assign, &url, status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            step: Step::Assign,
            url,
            detail: format!(
                "{e}: {}",
                quote(&String::from_utf8_lossy(&body), MAX_QUOTED_BODY)
            ),
        })
    }

    /// Step 2: `POST /mandelbox/assign`, retrying `503 NO_INSTANCE_AVAILABLE` (with backoff,
    /// [`assign_backoff`]) and `429 RATE_LIMITED` (after at least the service's `Retry-After`
    /// of 1 s) until `wait_for_capacity` has passed; without it, one attempt. Other errors are
    /// returned at once. Returns the assignment and the number of attempts.
    pub async fn assign_waiting(
        &self,
        token: &AccessToken,
        request: &AssignRequest,
        wait_for_capacity: Option<Duration>,
    ) -> Result<(Assignment, u32), ClientError> {
        let started = tokio::time::Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.assign(token, request).await {
                Ok(assignment) => return Ok((assignment, attempts)),
                Err(error)
                    if matches!(error.code(), Some("NO_INSTANCE_AVAILABLE" | "RATE_LIMITED")) =>
                {
                    let floor = if error.code() == Some("RATE_LIMITED") {
                        RATE_LIMITED_PAUSE
                    } else {
                        Duration::ZERO
                    };
                    let Some(wait) = wait_for_capacity else {
                        return Err(error);
                    };
                    let waited = started.elapsed();
                    let left = wait.saturating_sub(waited);
                    if left.is_zero() {
                        return Err(ClientError::NoCapacity { waited, attempts });
                    }
                    let jitter = 1.0 + ASSIGN_RETRY_JITTER * (rand::random::<f64>() * 2.0 - 1.0);
                    let pause = assign_backoff(attempts)
                        .mul_f64(jitter)
                        .max(floor)
                        .min(left);
                    tokio::time::sleep(pause).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Step 3: `PUT https://{ip}:4678/json_transport` with `json_data` (the text of a JSON
    /// object), over TLS pinned to the assignment's fingerprint.
    pub async fn json_transport(
        &self,
        assignment: &Assignment,
        token: &AccessToken,
        json_data: &str,
    ) -> Result<JsonTransportAnswer, ClientError> {
        self.json_transport_with_profile(assignment, token, json_data, None, false)
            .await
    }

    /// [`Client::json_transport`] with the user's profile token (`config_encryption_token`,
    /// `is_new_config_encryption_token`).
    pub async fn json_transport_with_profile(
        &self,
        assignment: &Assignment,
        token: &AccessToken,
        json_data: &str,
        config_token: Option<&str>,
        new_config_token: bool,
    ) -> Result<JsonTransportAnswer, ClientError> {
        let fingerprint =
            assignment
                .tls_fingerprint
                .as_deref()
                .ok_or(ClientError::NoFingerprint {
                    mandelbox_id: assignment.mandelbox_id,
                })?;
        let addr = SocketAddr::new(assignment.ip, self.options.json_transport_port);
        let url = format!("https://{addr}/json_transport");
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(pinned_tls_config(fingerprint)?)
            .http1_only()
            .no_proxy()
            .connect_timeout(self.options.connect_timeout)
            .timeout(self.options.json_transport_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("whist-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Tls(error_chain(&e)))?;
        let mut body = json!({
            "mandelbox_id": assignment.mandelbox_id,
            "json_data": json_data,
        });
        if let Some(config_token) = config_token {
            body["config_encryption_token"] = json!(config_token);
            body["is_new_config_encryption_token"] = json!(new_config_token);
        }
        let response = http
            .put(&url)
            .bearer_auth(token.expose())
            .json(&body)
            .send()
            .await
            .map_err(|e| request_error(Step::JsonTransport, &url, e))?;
        let (status, body) = read_body(Step::JsonTransport, &url, response).await?;
        if status != reqwest::StatusCode::OK {
            return Err(refusal(Step::JsonTransport, &url, status, &body));
        }
        JsonTransportAnswer::parse(&body).map_err(|detail| ClientError::BadAnswer {
            step: Step::JsonTransport,
            url,
            detail,
        })
    }

    /// Step 4: connects to the mandelbox and reads its first line.
    pub async fn connect(&self, ip: IpAddr, port: u16) -> Result<Connection, ClientError> {
        let addr = SocketAddr::new(ip, port);
        let started = Instant::now();
        let stream = tokio::time::timeout(self.options.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout {
                step: Step::Connect,
                addr,
                after: self.options.connect_timeout,
            })?
            .map_err(|e| ClientError::Io {
                step: Step::Connect,
                addr,
                detail: e.to_string(),
            })?;
        let connect_time = started.elapsed();
        let _ = stream.set_nodelay(true);
        let mut stream = BufReader::new(stream);
        let read_first_line = async {
            let io = |e: std::io::Error| ClientError::Io {
                step: Step::Connect,
                addr,
                detail: e.to_string(),
            };
            if stream.fill_buf().await.map_err(io)?.is_empty() {
                return Err(ClientError::ClosedByPeer {
                    step: Step::Connect,
                    addr,
                    after: started.elapsed(),
                });
            }
            let time_to_first_byte = started.elapsed();
            let mut line = Vec::new();
            (&mut stream)
                .take(MAX_FIRST_LINE_BYTES)
                .read_until(b'\n', &mut line)
                .await
                .map_err(io)?;
            if line.last() != Some(&b'\n') {
                return Err(ClientError::Io {
                    step: Step::Connect,
                    addr,
                    detail: format!("the first line is unterminated after {} bytes", line.len()),
                });
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            Ok((text, time_to_first_byte))
        };
        let (first_line, time_to_first_byte) =
            tokio::time::timeout(self.options.first_line_timeout, read_first_line)
                .await
                .map_err(|_| ClientError::Timeout {
                    step: Step::Connect,
                    addr,
                    after: self.options.first_line_timeout,
                })??;
        Ok(Connection {
            addr,
            first_line,
            connect_time,
            time_to_first_byte,
            first_line_time: started.elapsed(),
            stream,
        })
    }

    /// All four steps, timed: token (unless given), assign (waiting for capacity if asked),
    /// json_transport, connect, hold (if asked), leave.
    pub async fn run_session(
        &self,
        session: &SessionOptions,
    ) -> Result<SessionReport, Box<SessionFailure>> {
        let started = Instant::now();
        let mut timings = Timings::default();
        let failed = |step: Step,
                      error: ClientError,
                      timings: &Timings,
                      session_id: Option<&str>,
                      assignment: Option<&Assignment>| {
            Box::new(SessionFailure {
                step,
                error,
                user_id: session.user_id.clone(),
                session_id: session_id.map(str::to_owned),
                assignment: assignment.cloned(),
                timings: Timings {
                    total: started.elapsed(),
                    ..timings.clone()
                },
            })
        };

        let token = match &session.token {
            Some(token) => token.clone(),
            None => {
                let t = Instant::now();
                let token = self
                    .token(&session.user_id)
                    .await
                    .map_err(|e| failed(Step::Token, e, &timings, None, None))?;
                timings.token = Some(t.elapsed());
                token
            }
        };

        let request = self.assign_request(session.user_email.clone());
        let session_id = request.session_id.as_deref().unwrap_or_default();
        let t = Instant::now();
        let assigned = self
            .assign_waiting(&token, &request, session.wait_for_capacity)
            .await;
        timings.assign = Some(t.elapsed());
        let (assignment, assign_attempts) =
            assigned.map_err(|e| failed(Step::Assign, e, &timings, Some(session_id), None))?;
        let assigned = Some(&assignment);

        let t = Instant::now();
        let answer = self
            .json_transport_with_profile(
                &assignment,
                &token,
                &session.json_data,
                session.config_token.as_deref(),
                session.new_config_token,
            )
            .await
            .map_err(|e| failed(Step::JsonTransport, e, &timings, Some(session_id), assigned))?;
        timings.json_transport = Some(t.elapsed());
        let Some(port) = answer.port(SESSION_PORT) else {
            let error = ClientError::BadAnswer {
                step: Step::JsonTransport,
                url: format!(
                    "https://{}/json_transport",
                    SocketAddr::new(assignment.ip, self.options.json_transport_port)
                ),
                detail: format!("no port_{SESSION_PORT}"),
            };
            return Err(failed(
                Step::JsonTransport,
                error,
                &timings,
                Some(session_id),
                assigned,
            ));
        };

        let mut connection = self
            .connect(assignment.ip, port)
            .await
            .map_err(|e| failed(Step::Connect, e, &timings, Some(session_id), assigned))?;
        timings.connect = Some(connection.connect_time);
        timings.first_byte = Some(connection.time_to_first_byte);
        if let Some(hold) = session.hold {
            let t = Instant::now();
            let held = connection.hold(hold).await;
            timings.hold = Some(t.elapsed());
            held.map_err(|e| failed(Step::Hold, e, &timings, Some(session_id), assigned))?;
        }
        let first_line = std::mem::take(&mut connection.first_line);
        connection.close().await;
        timings.total = started.elapsed();
        Ok(SessionReport {
            user_id: session.user_id.clone(),
            session_id: request.session_id.clone().unwrap_or_default(),
            assignment,
            assign_attempts,
            ports: answer.ports,
            first_line,
            timings,
        })
    }
}

/// The pause after failed assign attempt `attempt` (1, 2, ...): [`ASSIGN_RETRY_BASE`] doubling
/// to [`ASSIGN_RETRY_CAP`], before jitter.
pub fn assign_backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    ASSIGN_RETRY_BASE
        .saturating_mul(1 << doublings)
        .min(ASSIGN_RETRY_CAP)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn assign_backoff_doubles_from_the_base_to_the_cap() {
        assert_eq!(assign_backoff(1), ASSIGN_RETRY_BASE);
        assert_eq!(assign_backoff(2), ASSIGN_RETRY_BASE * 2);
        assert_eq!(assign_backoff(3), ASSIGN_RETRY_BASE * 4);
        assert_eq!(assign_backoff(6), ASSIGN_RETRY_CAP);
        assert_eq!(assign_backoff(u32::MAX), ASSIGN_RETRY_CAP);
    }
}
