//! `mandelbox-stub`: the mandelbox's side of the host-service contract, for tests on a real
//! Docker Engine (the real mandelbox needs a GPU, X and the streaming protocol).
//!
//! In order, like `whist-startup.sh` and `run-whist-server.sh`:
//! 1. waits for `.paramsReady` in the resource-mapping directory (`/whist/resourceMappings`);
//! 2. reads `hostPort_for_my_32262_tcp`, `tty`, `gpu_index`, `session_id` and `timeout`;
//! 3. waits for `.configReady`, then reads `config.json` (it must be JSON);
//! 4. listens on 32261/tcp, 32262/tcp, 32273/tcp and 32263/udp, then writes
//!    `done_sleeping_until_X_clients` (the host's readiness marker);
//! 5. answers each TCP connection with one JSON line describing itself (the application-level
//!    reply that tells a real listener from docker-proxy), then reads lines: `exit N` exits with
//!    code N; when the first client of 32273/tcp (the protocol's base TCP port) disconnects, the
//!    stub exits 0, as WhistServer does when the user leaves;
//! 6. exits 0 when no client connected within `timeout` seconds (negative: wait forever).
//!
//! Every file it cannot read or parse makes it exit 2 with a message on stderr, so a host-service
//! test sees a `die` with that code. Environment: `WHIST_MAPPINGS_DIR` overrides the directory,
//! `WHIST_STUB_POLL_MS` the file polling period (default 20 ms).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

const TCP_PORTS: [u16; 3] = [32261, 32262, 32273];
const UDP_PORT: u16 = 32263;
/// The port whose client leaving ends the session.
const SESSION_PORT: u16 = 32273;

struct Params {
    host_port_32262: String,
    tty: String,
    gpu_index: String,
    session_id: String,
    timeout_seconds: i64,
    config: String,
}

enum Exit {
    Code(i32),
}

fn main() {
    let dir = PathBuf::from(
        std::env::var("WHIST_MAPPINGS_DIR").unwrap_or_else(|_| "/whist/resourceMappings".into()),
    );
    let poll = Duration::from_millis(
        std::env::var("WHIST_STUB_POLL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let code = match run(&dir, poll) {
        Ok(Exit::Code(code)) => code,
        Err(message) => {
            eprintln!("mandelbox-stub: {message}");
            2
        }
    };
    std::process::exit(code);
}

fn run(dir: &Path, poll: Duration) -> Result<Exit, String> {
    eprintln!(
        "mandelbox-stub: waiting for .paramsReady in {}",
        dir.display()
    );
    wait_for(&dir.join(".paramsReady"), poll);
    let read = |name: &str| -> Result<String, String> {
        std::fs::read_to_string(dir.join(name))
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("cannot read {name}: {e}"))
    };
    let host_port_32262 = read("hostPort_for_my_32262_tcp")?;
    host_port_32262
        .parse::<u16>()
        .map_err(|_| format!("hostPort_for_my_32262_tcp is not a port: {host_port_32262:?}"))?;
    let tty = read("tty")?;
    tty.parse::<u8>()
        .map_err(|_| format!("tty is not a number: {tty:?}"))?;
    let gpu_index = read("gpu_index")?;
    let session_id = read("session_id")?;
    let timeout_text = read("timeout")?;
    let timeout_seconds = timeout_text
        .parse::<i64>()
        .map_err(|_| format!("timeout is not a number: {timeout_text:?}"))?;

    eprintln!("mandelbox-stub: parameters read; waiting for .configReady");
    wait_for(&dir.join(".configReady"), poll);
    let config = read("config.json")?;
    if !looks_like_json_object(&config) {
        return Err(format!("config.json is not a JSON object: {config:?}"));
    }
    let params = Arc::new(Params {
        host_port_32262,
        tty,
        gpu_index,
        session_id,
        timeout_seconds,
        config,
    });

    let (events, exits) = mpsc::channel::<Exit>();
    let connected = Arc::new(AtomicBool::new(false));
    for port in TCP_PORTS {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .map_err(|e| format!("cannot listen on {port}/tcp: {e}"))?;
        let (params, events, connected) = (params.clone(), events.clone(), connected.clone());
        std::thread::spawn(move || accept_loop(listener, port, &params, &events, &connected));
    }
    let udp = UdpSocket::bind(("0.0.0.0", UDP_PORT))
        .map_err(|e| format!("cannot listen on {UDP_PORT}/udp: {e}"))?;
    std::thread::spawn(move || echo_udp(&udp));

    std::fs::write(dir.join("done_sleeping_until_X_clients"), "done")
        .map_err(|e| format!("cannot write the readiness marker: {e}"))?;
    eprintln!("mandelbox-stub: ready");

    let deadline = (params.timeout_seconds >= 0)
        .then(|| Instant::now() + Duration::from_secs(params.timeout_seconds.unsigned_abs()));
    loop {
        let wait = match deadline {
            Some(d) if !connected.load(Ordering::SeqCst) => {
                d.saturating_duration_since(Instant::now())
            }
            _ => Duration::from_secs(3600),
        };
        match exits.recv_timeout(wait) {
            Ok(exit) => return Ok(exit),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if deadline.is_some() && !connected.load(Ordering::SeqCst) {
                    eprintln!("mandelbox-stub: no client within the timeout; exiting");
                    return Ok(Exit::Code(0));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(Exit::Code(0)),
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    port: u16,
    params: &Params,
    events: &mpsc::Sender<Exit>,
    connected: &AtomicBool,
) {
    for stream in listener.incoming().flatten() {
        connected.store(true, Ordering::SeqCst);
        let first_session_client = port == SESSION_PORT;
        let hello = describe(params, port);
        let events = events.clone();
        std::thread::spawn(move || {
            let exit = serve(stream, &hello);
            match exit {
                Some(exit) => {
                    let _ = events.send(exit);
                }
                None if first_session_client => {
                    eprintln!("mandelbox-stub: the client left; exiting");
                    let _ = events.send(Exit::Code(0));
                }
                None => {}
            }
        });
    }
}

/// Greets the client, then reads commands until it hangs up.
fn serve(mut stream: TcpStream, hello: &str) -> Option<Exit> {
    if stream.write_all(hello.as_bytes()).is_err() {
        return None;
    }
    let reader = BufReader::new(stream.try_clone().ok()?);
    for line in reader.lines() {
        let Ok(line) = line else { return None };
        let line = line.trim();
        if let Some(code) = line.strip_prefix("exit") {
            let code = code.trim().parse().unwrap_or(0);
            return Some(Exit::Code(code));
        }
        if line == "ping" && stream.write_all(b"pong\n").is_err() {
            return None;
        }
    }
    None
}

fn echo_udp(socket: &UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(&buf[..n], from);
    }
}

fn describe(p: &Params, port: u16) -> String {
    format!(
        "{{\"mandelbox\":\"stub\",\"port\":{port},\"host_port_32262\":{},\"tty\":{},\"gpu_index\":{},\"session_id\":\"{}\",\"config\":{}}}\n",
        p.host_port_32262,
        p.tty,
        json_string_or_number(&p.gpu_index),
        p.session_id.replace(['"', '\\'], ""),
        p.config.replace('\n', " "),
    )
}

fn json_string_or_number(s: &str) -> String {
    if s.parse::<i64>().is_ok() {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace(['"', '\\'], ""))
    }
}

/// A cheap structural check: the stub has no JSON parser, and the host writes what the client
/// sent, which the host has already parsed.
fn looks_like_json_object(s: &str) -> bool {
    let t = s.trim();
    t.starts_with('{') && t.ends_with('}')
}

/// Polls for a file the host writes; the real mandelbox scripts poll the same way.
fn wait_for(path: &Path, poll: Duration) {
    while !path.exists() {
        std::thread::sleep(poll);
    }
}
