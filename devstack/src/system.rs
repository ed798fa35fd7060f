//! The whole system on one machine: the stack ([`crate::stack`]), moto prepared as the account
//! the scaling service expects ([`crate::moto::seed`]), the scaling service launching hosts into
//! moto, and the fleet emulator ([`crate::fleet`]) booting a host service for every instance it
//! launches. `whist-devstack up --system` (`make run`) runs it until Ctrl-C; the end-to-end
//! and chaos tests drive it through this module.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::process::{Child, Command};

use crate::ec2_faults::{Ec2FaultProxy, Fault, FaultRates};
use crate::fleet::{Fleet, FleetOptions, copy_lines};
use crate::stack::{Stack, StackOptions};

/// The environment launched hosts and the scaling service run in.
pub const APP_ENV: &str = "localdevwithdb";
/// The instance type launched: g4dn.2xlarge holds min(1 GPU × 3, 8 vCPUs / 4) = 2 mandelboxes.
pub const INSTANCE_TYPE: &str = "g4dn.2xlarge";
pub const HOST_CAPACITY: u32 = 2;
/// How long the scaling service gets to answer `/healthz` after it starts (it compiles nothing;
/// a cold, loaded CI machine still starts it in seconds).
const SCALING_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What to run.
#[derive(Debug, Clone)]
pub struct SystemOptions {
    /// The stack's options; moto is required.
    pub stack: StackOptions,
    pub regions: Vec<String>,
    /// Where `whist-scaling-service` and `whist-host-service` are ([`bin_dir`]).
    pub bin_dir: PathBuf,
    /// The scaling service's port (0: a free one).
    pub scaling_port: u16,
    pub desired_free_mandelboxes: u32,
    pub max_instances_per_region: u32,
    pub scheduler_interval_secs: u64,
    /// Print the services' logs (prefixed) besides writing them to files.
    pub echo_logs: bool,
    /// Extra variables for the scaling service, over the defaults.
    pub scaling_env: Vec<(String, String)>,
    /// Extra variables for every host service, over the defaults.
    pub host_env: Vec<(String, String)>,
    /// Each host reaches Docker through a proxy of its own, whose event streams
    /// [`Fleet::cut_docker_events`] cuts (chaos; [`FleetOptions::docker_proxy`]).
    pub docker_proxy: bool,
    /// The fleet's SIGTERM → SIGKILL grace when an instance is terminated.
    pub host_stop_grace: Duration,
    /// Put [`crate::ec2_faults::Ec2FaultProxy`] between the scaling service and moto, drawing
    /// faults at these rates from the start (chaos); [`System::ec2_faults`] changes them.
    pub ec2_faults: Option<FaultRates>,
    /// With [`SystemOptions::ec2_faults`]: faults for the first calls of these actions.
    pub ec2_fault_queue: Vec<(String, Fault)>,
}

impl SystemOptions {
    pub fn new(stack: StackOptions) -> Self {
        Self {
            stack,
            regions: vec!["us-east-1".to_owned()],
            bin_dir: bin_dir(),
            scaling_port: 0,
            desired_free_mandelboxes: 2,
            max_instances_per_region: 4,
            scheduler_interval_secs: 10,
            echo_logs: false,
            scaling_env: Vec::new(),
            host_env: Vec::new(),
            docker_proxy: false,
            host_stop_grace: Duration::from_secs(30),
            ec2_faults: None,
            ec2_fault_queue: Vec::new(),
        }
    }
}

/// Where the workspace's binaries are: `WHIST_BIN_DIR`, else beside the running executable
/// (`target/debug`, also for a test in `target/debug/deps`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WHIST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// A running system.
#[derive(Debug)]
pub struct System {
    stack: Stack,
    fleet: Fleet,
    scaling: Option<Child>,
    scaling_command: ScalingCommand,
    scaling_url: String,
    images: Vec<crate::moto::RegionSeed>,
    ec2_faults: Option<Ec2FaultProxy>,
}

#[derive(Debug, Clone)]
struct ScalingCommand {
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    echo: bool,
}

impl System {
    pub async fn up(options: SystemOptions) -> anyhow::Result<Self> {
        let scaling_binary = options.bin_dir.join("whist-scaling-service");
        let host_binary = options.bin_dir.join("whist-host-service");
        for binary in [&scaling_binary, &host_binary] {
            anyhow::ensure!(
                binary.is_file(),
                "{} is missing: run `cargo build --bins` first (or set WHIST_BIN_DIR)",
                binary.display()
            );
        }
        anyhow::ensure!(
            options.stack.moto_bin.is_some(),
            "the system needs moto as its EC2"
        );
        let stack = Stack::up(options.stack.clone()).await?;
        let moto = stack.moto_endpoint().context("moto is not running")?;
        let images = crate::moto::seed(&moto, APP_ENV, &options.regions)
            .await
            .context("preparing moto")?;
        {
            let sql = crate::postgres::connect(stack.database_url()).await?;
            for seed in &images {
                sql.execute(
                    "INSERT INTO whist.images (provider, region, image_id, client_sha, updated_at) \
                     VALUES ('AWS', $1, $2, 'dev', now()) \
                     ON CONFLICT (provider, region) DO UPDATE SET image_id = EXCLUDED.image_id",
                    &[&seed.region, &seed.image_id],
                )
                .await
                .context("inserting the images rows")?;
            }
        }
        let env: std::collections::BTreeMap<&str, String> = stack.env().into_iter().collect();
        let get = |name: &str| env.get(name).cloned().unwrap_or_default();

        let mut host_env: Vec<(String, String)> = [
            ("APP_ENV", APP_ENV.to_owned()),
            ("HASURA_GRAPHQL_URL", get("HASURA_GRAPHQL_URL")),
            ("HASURA_ADMIN_SECRET", get("HASURA_ADMIN_SECRET")),
            ("WHIST_AUTH_ISSUER", get("WHIST_AUTH_ISSUER")),
            ("WHIST_AUTH_JWKS_URL", get("WHIST_AUTH_JWKS_URL")),
            // Users' profiles in moto's S3 (straight to moto: EC2 faults are not S3's).
            ("WHIST_PROFILE_BUCKET", get("WHIST_PROFILE_BUCKET")),
            (
                "WHIST_PROFILE_S3_ENDPOINT",
                get("WHIST_PROFILE_S3_ENDPOINT"),
            ),
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
            ("WHIST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        host_env.extend(options.host_env.iter().cloned());
        let mut fleet_options = FleetOptions::new(
            moto.clone(),
            options.regions.clone(),
            host_binary,
            stack.state_dir().join("hosts"),
        );
        fleet_options.host_env = host_env;
        fleet_options.host_capacity = HOST_CAPACITY;
        fleet_options.echo_logs = options.echo_logs;
        fleet_options.stop_grace = options.host_stop_grace;
        fleet_options.docker_proxy = options.docker_proxy;
        let fleet = Fleet::start(fleet_options).await?;

        let ec2_faults = match options.ec2_faults {
            Some(rates) => {
                let moto_port = url::Url::parse(&moto)
                    .ok()
                    .and_then(|u| u.port())
                    .context("moto's port")?;
                let proxy = Ec2FaultProxy::start(moto_port).await?;
                proxy.set_rates(rates);
                for (action, fault) in &options.ec2_fault_queue {
                    proxy.inject(action, [*fault]);
                }
                Some(proxy)
            }
            None => None,
        };
        let scaling_ec2 = ec2_faults
            .as_ref()
            .map_or_else(|| moto.clone(), Ec2FaultProxy::endpoint);
        let port = match options.scaling_port {
            0 => crate::postgres::free_port().context("picking the scaling service's port")?,
            p => p,
        };
        let mut scaling_env: Vec<(String, String)> = [
            ("APP_ENV", APP_ENV.to_owned()),
            ("HASURA_GRAPHQL_URL", get("HASURA_GRAPHQL_URL")),
            ("HASURA_ADMIN_SECRET", get("HASURA_ADMIN_SECRET")),
            ("WHIST_REGIONS", options.regions.join(",")),
            ("WHIST_CLOUD", "ec2".to_owned()),
            ("AWS_ENDPOINT_URL", scaling_ec2),
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
            ("AUTH0_JWKS_URL", get("AUTH0_JWKS_URL")),
            ("AUTH0_ISSUER", get("AUTH0_ISSUER")),
            ("AUTH0_AUDIENCE", get("AUTH0_AUDIENCE")),
            ("PORT", port.to_string()),
            ("WHIST_INSTANCE_TYPE", INSTANCE_TYPE.to_owned()),
            (
                "DESIRED_FREE_MANDELBOXES",
                options.desired_free_mandelboxes.to_string(),
            ),
            (
                "WHIST_MAX_INSTANCES_PER_REGION",
                options.max_instances_per_region.to_string(),
            ),
            (
                "WHIST_SCHEDULER_INTERVAL_SECS",
                options.scheduler_interval_secs.to_string(),
            ),
            ("WHIST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        scaling_env.extend(options.scaling_env.iter().cloned());
        let scaling_command = ScalingCommand {
            binary: scaling_binary,
            env: scaling_env,
            log: stack.state_dir().join("scaling-service.log"),
            echo: options.echo_logs,
        };
        let mut system = Self {
            stack,
            fleet,
            scaling: None,
            scaling_command,
            scaling_url: format!("http://127.0.0.1:{port}"),
            images,
            ec2_faults,
        };
        system.start_scaling().await?;
        Ok(system)
    }

    /// Starts the scaling service (again, after [`System::signal_scaling`]) and waits until it
    /// answers `/healthz`.
    pub async fn start_scaling(&mut self) -> anyhow::Result<()> {
        let c = &self.scaling_command;
        let mut child = Command::new(&c.binary)
            .env_clear()
            .envs(
                ["PATH", "HOME"]
                    .iter()
                    .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
            )
            .envs(c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NO_COLOR", "1")
            // Its own process group: a terminal's Ctrl-C reaches devstack alone, which stops
            // the scaling service first (`System::down`).
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", c.binary.display()))?;
        let echo = c.echo.then(|| "[scaling] ".to_owned());
        if let Some(out) = child.stdout.take() {
            tokio::spawn(copy_lines(out, c.log.clone(), echo.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(copy_lines(err, c.log.clone(), echo));
        }
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                anyhow::bail!(
                    "the scaling service exited at start ({status}); its log: {}",
                    c.log.display()
                );
            }
            if let Ok(r) = client
                .get(format!("{}/healthz", self.scaling_url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && r.status().is_success()
            {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < SCALING_READY_TIMEOUT,
                "the scaling service did not answer within {SCALING_READY_TIMEOUT:?}; its log: {}",
                c.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.scaling = Some(child);
        Ok(())
    }

    /// Sends `signal` to the scaling service and waits for it to exit (chaos: SIGKILL is a
    /// crash). Start it again with [`System::start_scaling`].
    pub async fn signal_scaling(
        &mut self,
        signal: nix::sys::signal::Signal,
    ) -> Option<std::process::ExitStatus> {
        let mut child = self.scaling.take()?;
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
        child.wait().await.ok()
    }

    /// The scaling service's pid while it runs.
    pub fn scaling_pid(&self) -> Option<u32> {
        self.scaling.as_ref().and_then(Child::id)
    }

    /// `http://127.0.0.1:PORT`: `/mandelbox/assign`, `/metrics`, `/healthz`.
    pub fn scaling_url(&self) -> &str {
        &self.scaling_url
    }

    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The AMI (and moto resources) per region.
    pub fn regions(&self) -> &[crate::moto::RegionSeed] {
        &self.images
    }

    /// The fault proxy between the scaling service and moto, when
    /// [`SystemOptions::ec2_faults`] asked for it.
    pub fn ec2_faults(&self) -> Option<&Ec2FaultProxy> {
        self.ec2_faults.as_ref()
    }

    /// The scaling service's log file.
    pub fn scaling_log(&self) -> &Path {
        &self.scaling_command.log
    }

    /// Stops the scaling service first (nothing launches while hosts stop), then every host
    /// (they drain), then the stack.
    pub async fn down(mut self) -> anyhow::Result<()> {
        self.signal_scaling(nix::sys::signal::Signal::SIGTERM).await;
        self.fleet.stop().await;
        self.stack.down().await
    }
}
