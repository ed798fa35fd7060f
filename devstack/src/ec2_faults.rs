//! A fault-injecting HTTP proxy in front of moto: what moto cannot do, EC2 does to a client —
//! throttling (`RequestLimitExceeded`), server errors (`InternalError`, 503 `Unavailable`),
//! answers lost after the call took effect, and slow answers. Faults are either queued for the
//! next calls of an action (exact tests) or drawn at random at fixed rates (the chaos suite).
//! Every call is recorded with the fault it got.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a call gets instead of moto's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and EC2 error code; moto never sees the call.
    Error(u16, &'static str),
    /// Forward to moto (the call takes effect), then answer with this error instead.
    LoseResponse(u16, &'static str),
    /// Answer this late.
    Delay(Duration),
}

/// Random faults: each call independently gets at most one, with these probabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultRates {
    /// 400 `RequestLimitExceeded`.
    pub throttle: f64,
    /// 500 `InternalError` or 503 `Unavailable`.
    pub server_error: f64,
    /// The call takes effect but its answer is a 500.
    pub lost_response: f64,
    /// The answer comes [`FaultRates::delay`] late.
    pub slow: f64,
    pub delay: Duration,
}

#[derive(Debug, Default)]
struct State {
    queued: VecDeque<(String, Fault)>,
    rates: FaultRates,
    calls: Vec<(String, Option<Fault>)>,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct Ec2FaultProxy {
    port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ec2FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    match state.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Ec2FaultProxy {
    /// Listens on a free loopback port and forwards to moto on `upstream`.
    pub async fn start(upstream: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve_one(stream, upstream, state).await;
                });
            }
        });
        Ok(Self { port, state, task })
    }

    /// The value for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The next calls of `action` (e.g. `RunInstances`) get these faults, in order.
    pub fn inject(&self, action: &str, faults: impl IntoIterator<Item = Fault>) {
        let mut state = lock(&self.state);
        state
            .queued
            .extend(faults.into_iter().map(|f| (action.to_owned(), f)));
    }

    /// From now on, calls without a queued fault draw one at these rates.
    pub fn set_rates(&self, rates: FaultRates) {
        lock(&self.state).rates = rates;
    }

    /// Calls of `action` so far.
    pub fn calls_of(&self, action: &str) -> usize {
        lock(&self.state)
            .calls
            .iter()
            .filter(|(a, _)| a == action)
            .count()
    }

    /// (calls, faults injected) so far.
    pub fn counts(&self) -> (usize, usize) {
        let state = lock(&self.state);
        let faulted = state.calls.iter().filter(|(_, f)| f.is_some()).count();
        (state.calls.len(), faulted)
    }
}

fn draw(rates: &FaultRates) -> Option<Fault> {
    let roll: f64 = rand::random();
    let mut edge = rates.throttle;
    if roll < edge {
        return Some(Fault::Error(400, "RequestLimitExceeded"));
    }
    edge += rates.server_error;
    if roll < edge {
        return Some(if rand::random::<bool>() {
            Fault::Error(500, "InternalError")
        } else {
            Fault::Error(503, "Unavailable")
        });
    }
    edge += rates.lost_response;
    if roll < edge {
        return Some(Fault::LoseResponse(500, "InternalError"));
    }
    edge += rates.slow;
    (roll < edge).then_some(Fault::Delay(rates.delay))
}

/// Serves one request per connection (the answer says `Connection: close`).
async fn serve_one(
    mut client: TcpStream,
    upstream: u16,
    state: Arc<Mutex<State>>,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let header_end = loop {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buffer.len() < header_end + length {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buffer[header_end..]).to_string();
    let action = body
        .split('&')
        .find_map(|pair| pair.strip_prefix("Action="))
        .unwrap_or("")
        .to_owned();
    let fault = {
        let mut state = lock(&state);
        let queued = state
            .queued
            .iter()
            .position(|(a, _)| *a == action)
            .and_then(|at| state.queued.remove(at))
            .map(|(_, f)| f);
        let fault = queued.or_else(|| draw(&state.rates));
        state.calls.push((action, fault));
        fault
    };
    let error = |status: u16, code: &str| {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
             <Message>injected by devstack's fault proxy</Message></Error></Errors><RequestID>proxy</RequestID></Response>"
        );
        format!(
            "HTTP/1.1 {status} Injected\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    match fault {
        Some(Fault::Error(status, code)) => {
            client.write_all(error(status, code).as_bytes()).await?;
        }
        Some(Fault::LoseResponse(status, code)) => {
            forward(&buffer, upstream).await?;
            client.write_all(error(status, code).as_bytes()).await?;
        }
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            let response = forward(&buffer, upstream).await?;
            client.write_all(&response).await?;
        }
        None => {
            let response = forward(&buffer, upstream).await?;
            client.write_all(&response).await?;
        }
    }
    client.shutdown().await
}

/// Sends the request to moto with `Connection: close` and returns its whole answer.
async fn forward(request: &[u8], upstream: u16) -> std::io::Result<Vec<u8>> {
    let mut moto = TcpStream::connect(("127.0.0.1", upstream)).await?;
    moto.write_all(request).await?;
    let mut response = Vec::new();
    moto.read_to_end(&mut response).await?;
    Ok(response)
}
