//! `make bench`: the host service's spin-up overhead and its idle memory.
//!
//! 1. Bare Docker: create + start of the mandelbox test image through the Docker API (bollard),
//!    the cost no host agent can avoid.
//! 2. The host service: from the ALLOCATED event reaching the host to `.paramsReady` (claim,
//!    resources, directories, create, parameters, start), read from its own histogram one
//!    sequential spin-up at a time.
//!
//! 3. Bare Docker again, with the very spec the host builds (`mandelbox::build_spec`): published
//!    ports, binds, tmpfs mounts and limits cost Docker time that no agent can avoid either.
//!
//! The ratio of the host's median to the same-spec median is the overhead (goal: under 1.2); the
//! ratio to the minimal spec is printed beside it. Then the release binary runs
//! idle against the local stack and its resident memory is read from /proc (goal: under 20 MB).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dbclient::types::{
    ImageId, InstanceId, MandelboxId, MandelboxStatus, NewMandelbox, Region, UserId,
};
use dbclient::{DbClient, DbConfig};
use devstack::testing::{TEST_ADMIN_SECRET, TestStack};
use host_service::Signals;
use host_service::docker::{ContainerRuntime, ContainerSpec, DEFAULT_SOCKET, DockerRuntime};
use host_service::metadata::InstanceIdentity;
use host_service::pairing::ClientRequest;
use logger::Secret;

const SAMPLES: usize = 15;
const IMAGE: &str = "whist/browsers/chrome:current-build";
const AMI: &str = "ami-0123456789abcdef0";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runtime = DockerRuntime::connect(DEFAULT_SOCKET).await?;

    // 1. Bare create + start.
    let mut bare = Vec::new();
    for n in 0..SAMPLES {
        let mut spec = ContainerSpec::new(
            format!("whist-bench-bare-{n}-{}", std::process::id()),
            IMAGE,
        );
        spec.labels.insert("whist.bench".into(), "bare".into());
        let started = Instant::now();
        let id = runtime.create(&spec).await?;
        runtime.start(&id).await?;
        bare.push(started.elapsed());
        runtime.remove(&id, true).await?;
    }

    // 2. Through the host service.
    let stack = TestStack::start().await?;
    let db = DbClient::new(&DbConfig::new(
        &stack.graphql_url(),
        Some(Secret::new(TEST_ADMIN_SECRET.to_owned())),
    )?)?;
    let instance = InstanceId::new("i-bench0000000001")?;
    stack
        .sql()
        .await?
        .execute(
            "INSERT INTO whist.instances (id, provider, region, image_id, client_sha, \
             instance_type, remaining_capacity, status) VALUES ($1, 'AWS', 'us-east-1', $2, $3, \
             'g4dn.12xlarge', 0, 'PRE_CONNECTION')",
            &[
                &instance.as_str(),
                &AMI,
                &host_service::config::BUILD_COMMIT,
            ],
        )
        .await?;
    let root = tempfile::tempdir()?;
    let config = {
        use clap::Parser as _;
        let mut c = host_service::config::Args::try_parse_from([
            "whist-host-service",
            "--app-env",
            "localdevwithdb",
            "--graphql-url",
            &stack.graphql_url(),
            "--admin-secret",
            TEST_ADMIN_SECRET,
            // The cold path is what this measures.
            "--warm-mandelboxes",
            "0",
        ])?
        .validate()?;
        c.root_dir = root.path().to_owned();
        c.gpu_override = Some(6);
        c.ops_addr = "127.0.0.1:0".parse()?;
        c.json_transport_addr = "127.0.0.1:0".parse()?;
        c.port_range = 30000..30400;
        c.stop_grace = Duration::from_secs(1);
        c.drain_deadline = Duration::from_millis(100);
        c
    };
    let identity = InstanceIdentity {
        instance_id: instance.clone(),
        ami_id: ImageId::new(AMI)?,
        region: Region::new("us-east-1")?,
        instance_type: "g4dn.12xlarge".into(),
        public_ipv4: Some(Ipv4Addr::LOCALHOST),
        private_ipv4: None,
        name: None,
    };
    let spec_config = config.clone();
    let signals = Signals::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let service = tokio::spawn(host_service::run_with(
        config,
        identity,
        runtime.clone(),
        signals.clone(),
        move |host| {
            let _ = tx.send(host);
        },
    ));
    let host = rx.await?;
    let mut hosted = Vec::new();
    for n in 0..SAMPLES {
        let (sum0, count0) = (
            host.metrics.params_ready_seconds.get_sample_sum(),
            host.metrics.params_ready_seconds.get_sample_count(),
        );
        let id = MandelboxId::random();
        let user = UserId::new(format!("bench{n}"))?;
        db.allocate_mandelbox(&NewMandelbox {
            id,
            app: "CHROME".into(),
            instance_id: instance.clone(),
            user_id: Some(user.clone()),
            session_id: None,
            status: MandelboxStatus::Allocated,
        })
        .await?
        .ok_or_else(|| anyhow::anyhow!("no capacity"))?;
        let answer = host
            .json_transport(ClientRequest {
                mandelbox_id: id,
                json_data: "{}".into(),
                user_id: Some(user),
                profile: Default::default(),
            })
            .await?;
        let (sum1, count1) = (
            host.metrics.params_ready_seconds.get_sample_sum(),
            host.metrics.params_ready_seconds.get_sample_count(),
        );
        anyhow::ensure!(count1 == count0 + 1, "one sample per spin-up");
        hosted.push(Duration::from_secs_f64(sum1 - sum0));
        // The user leaves; wait until the mandelbox is gone before the next one.
        let port = answer.host_ports[&32273];
        drop(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
        let deadline = Instant::now() + Duration::from_secs(60);
        while host.live_mandelboxes() > 0 {
            anyhow::ensure!(Instant::now() < deadline, "teardown took too long");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    signals.drain.cancel();
    service.await??;

    // 1b. Bare create + start again, with the spec the host gives a mandelbox (its published
    // ports, binds, tmpfs mounts and limits, from the same pure `build_spec`): what Docker itself
    // costs for a real mandelbox, which no host agent can avoid either.
    let spec_root = tempfile::tempdir()?;
    let mut same_spec = Vec::new();
    for n in 0..SAMPLES {
        let id = MandelboxId::random();
        let row = dbclient::types::Mandelbox {
            id,
            app: "CHROME".into(),
            instance_id: instance.clone(),
            user_id: None,
            session_id: None,
            status: MandelboxStatus::Allocated,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        };
        // Above the host's range (30000..30400), four fresh ports per sample.
        let ports: host_service::ports::PortMap = host_service::ports::MANDELBOX_PORTS
            .iter()
            .zip(30400 + 4 * n as u16..)
            .map(|(port, host_port)| (*port, host_port))
            .collect();
        let allocation = host_service::resources::Allocation {
            ports,
            tty: 0,
            gpu: None,
        };
        let dirs = host_service::mappings::MandelboxDirs::new(spec_root.path(), id);
        dirs.create("1").await?;
        let mut spec = host_service::mandelbox::build_spec(
            &spec_config,
            &host_service::mandelbox::Machine::probe(0),
            &row,
            &allocation,
            &dirs,
            "1",
            IMAGE,
            "00000000000000000000000000000000",
        );
        spec.labels.insert("whist.bench".into(), "same-spec".into());
        let started = Instant::now();
        let container = runtime.create(&spec).await?;
        runtime.start(&container).await?;
        same_spec.push(started.elapsed());
        runtime.remove(&container, true).await?;
    }

    let (bare_p50, same_p50, hosted_p50) = (
        median(&mut bare),
        median(&mut same_spec),
        median(&mut hosted),
    );
    println!(
        "spin-up: bare Docker create+start p50 {:.0} ms (minimal spec), {:.0} ms (the host's spec); host service ALLOCATED event to .paramsReady p50 {:.0} ms; ratio {:.2} against the host's spec, {:.2} against the minimal one (goal < 1.2; {SAMPLES} sequential samples each)",
        ms(bare_p50),
        ms(same_p50),
        ms(hosted_p50),
        hosted_p50.as_secs_f64() / same_p50.as_secs_f64(),
        hosted_p50.as_secs_f64() / bare_p50.as_secs_f64()
    );

    // 3. Idle resident memory of the release binary.
    match idle_rss(&stack).await {
        Ok((rss_kib, binary)) => println!(
            "host service idle RSS: {:.1} MB ({}) (goal < 20 MB)",
            rss_kib as f64 / 1024.0,
            binary.display()
        ),
        Err(error) => println!("host service idle RSS: not measured ({error:#})"),
    }
    Ok(())
}

async fn idle_rss(stack: &TestStack) -> anyhow::Result<(u64, PathBuf)> {
    let binary =
        PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
            .join("release/whist-host-service");
    anyhow::ensure!(
        binary.is_file(),
        "{} not built (make bench builds it)",
        binary.display()
    );
    let id = "i-bench0000000002";
    stack
        .sql()
        .await?
        .execute(
            "INSERT INTO whist.instances (id, provider, region, image_id, client_sha, \
             instance_type, remaining_capacity, status) VALUES ($1, 'AWS', 'us-east-1', $2, $3, \
             'g4dn.xlarge', 0, 'PRE_CONNECTION')",
            &[&id, &AMI, &host_service::config::BUILD_COMMIT],
        )
        .await?;
    let mut identity = devstack::imds::Identity::local(id, "us-east-1");
    identity.ami_id = AMI.into();
    let imds = devstack::imds::FakeImds::spawn(identity).await?;
    let root = tempfile::tempdir()?;
    let ops_port = devstack::postgres::free_port()?;
    let mut child = tokio::process::Command::new(&binary)
        .env("APP_ENV", "localdevwithdb")
        .env("HASURA_GRAPHQL_URL", stack.graphql_url())
        .env("HASURA_ADMIN_SECRET", TEST_ADMIN_SECRET)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint())
        .env("WHIST_ROOT", root.path())
        .env("WHIST_OPS_ADDR", format!("127.0.0.1:{ops_port}"))
        .env("WHIST_LOG", "warn")
        // Idle: no warm boxes being made.
        .env("WHIST_WARM_MANDELBOXES", "0")
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if reqwest::get(format!("http://127.0.0.1:{ops_port}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the host service did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let it settle into its idle loops (heartbeat, sweeper, subscriptions) before reading.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    child.kill().await?;
    Ok((rss, binary))
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
