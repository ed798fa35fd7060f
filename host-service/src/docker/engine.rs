//! [`DockerRuntime`]: [`ContainerRuntime`] on the real Docker Engine, through bollard.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::PortSummaryTypeEnum;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, InspectContainerOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use edge::error_chain;
use futures::{Stream, StreamExt};

use super::events::EVENT_ACTIONS;
use super::{
    API_CALL_TIMEOUT, BOLLARD_BACKSTOP_TIMEOUT, ContainerEvent, ContainerId, ContainerRuntime,
    ContainerSpec, ContainerState, ContainerStatus, LABEL_MANAGED, LABEL_MANAGED_VALUE,
    MAX_STOP_GRACE, MandelboxContainer, Op, RuntimeError, STOP_TIMEOUT_MARGIN, image_matches_app,
    parse_event, validate_app_pattern,
};
use crate::ports::{ContainerPort, PortMap, Protocol};

/// [`ContainerRuntime`] on the real Docker Engine, through bollard over the local socket, at
/// the API version the engine supports (negotiated at connect: this code's bollard speaks 1.53,
/// while e.g. Engine 20.10 answers 400 to anything above 1.41).
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    socket: String,
}

impl DockerRuntime {
    /// Connects to the engine at `socket` (e.g. [`DEFAULT_SOCKET`]) and negotiates the API
    /// version, within [`API_CALL_TIMEOUT`].
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, RuntimeError> {
        let socket = socket.as_ref().to_string_lossy().into_owned();
        let transport = |message: String| RuntimeError::Transport {
            op: Op::Connect,
            target: String::new(),
            socket: socket.clone(),
            message,
        };
        let docker = Docker::connect_with_unix(
            &socket,
            BOLLARD_BACKSTOP_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| transport(error_chain(&e)))?;
        let docker = match tokio::time::timeout(API_CALL_TIMEOUT, docker.negotiate_version()).await
        {
            Ok(Ok(docker)) => docker,
            Ok(Err(e)) => return Err(transport(error_chain(&e))),
            Err(_) => {
                return Err(RuntimeError::Timeout {
                    op: Op::Connect,
                    target: String::new(),
                    timeout: API_CALL_TIMEOUT,
                });
            }
        };
        tracing::debug!(socket, api_version = %docker.client_version(), "connected to the Docker Engine");
        Ok(Self { docker, socket })
    }

    /// The API version in use after negotiation, e.g. `1.41`.
    pub fn api_version(&self) -> String {
        self.docker.client_version().to_string()
    }

    /// The engine's security options (`docker info`), e.g. `name=seccomp,profile=default`.
    pub async fn security_options(&self) -> Result<Vec<String>, RuntimeError> {
        let info = self
            .call(Op::Connect, "", API_CALL_TIMEOUT, self.docker.info())
            .await?;
        Ok(info.security_options.unwrap_or_default())
    }

    /// The bollard client, for tests and diagnostics that need more than the trait.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Runs one engine call with a deadline and maps its error.
    async fn call<T>(
        &self,
        op: Op,
        target: &str,
        timeout: Duration,
        request: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, RuntimeError> {
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(map_error(op, target, &self.socket, &e)),
            Err(_) => Err(RuntimeError::Timeout {
                op,
                target: target.to_owned(),
                timeout,
            }),
        }
    }
}

/// Maps a bollard error to ours, keeping the engine's message.
fn map_error(op: Op, target: &str, socket: &str, error: &bollard::errors::Error) -> RuntimeError {
    use bollard::errors::Error as E;
    let target = target.to_owned();
    match error {
        E::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            404 => RuntimeError::NotFound {
                op,
                target,
                message: message.clone(),
            },
            409 => RuntimeError::Conflict {
                op,
                target,
                message: message.clone(),
            },
            status => RuntimeError::Engine {
                op,
                target,
                status: *status,
                message: message.clone(),
            },
        },
        E::RequestTimeoutError => RuntimeError::Timeout {
            op,
            target,
            timeout: BOLLARD_BACKSTOP_TIMEOUT,
        },
        E::JsonDataError { .. }
        | E::JsonSerdeError { .. }
        | E::APIVersionParseError {}
        | E::StrParseError { .. } => RuntimeError::Protocol {
            op,
            target,
            message: error_chain(error),
        },
        _ => RuntimeError::Transport {
            op,
            target,
            socket: socket.to_owned(),
            message: error_chain(error),
        },
    }
}

/// Docker's `t` for a stop: whole seconds, rounded up, clamped to [`MAX_STOP_GRACE`].
fn stop_grace_seconds(grace: Duration) -> i32 {
    let grace = grace.min(MAX_STOP_GRACE);
    let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

/// The `since` of an events request: now, as `seconds.nanoseconds` since the epoch.
fn events_since_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

fn managed_label_filter() -> String {
    format!("{LABEL_MANAGED}={LABEL_MANAGED_VALUE}")
}

fn summary_ports(ports: Option<Vec<bollard::models::PortSummary>>) -> PortMap {
    ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let protocol = match p.typ {
                Some(PortSummaryTypeEnum::TCP) => Protocol::Tcp,
                Some(PortSummaryTypeEnum::UDP) => Protocol::Udp,
                _ => return None,
            };
            let container = ContainerPort {
                port: p.private_port,
                protocol,
            };
            Some((container, p.public_port?))
        })
        .collect()
}

impl ContainerRuntime for DockerRuntime {
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        spec.validate()?;
        let options = CreateContainerOptionsBuilder::new()
            .name(&spec.name)
            .build();
        let body = spec.to_create_body();
        let response = self
            .call(
                Op::Create,
                &spec.name,
                API_CALL_TIMEOUT,
                self.docker.create_container(Some(options), body),
            )
            .await?;
        for warning in &response.warnings {
            tracing::warn!(container.name = %spec.name, %warning, "Docker Engine warning on create");
        }
        ContainerId::new(response.id).map_err(|_| RuntimeError::Protocol {
            op: Op::Create,
            target: spec.name.clone(),
            message: "the engine returned an invalid container id".to_owned(),
        })
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        self.call(
            Op::Start,
            id.as_str(),
            API_CALL_TIMEOUT,
            self.docker.start_container(id.as_str(), None),
        )
        .await
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        let t = stop_grace_seconds(grace);
        let options = StopContainerOptionsBuilder::new().t(t).build();
        let deadline = Duration::from_secs(u64::from(t.unsigned_abs())) + STOP_TIMEOUT_MARGIN;
        match self
            .call(
                Op::Stop,
                id.as_str(),
                deadline,
                self.docker.stop_container(id.as_str(), Some(options)),
            )
            .await
        {
            Err(RuntimeError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn remove(&self, id: &ContainerId, force: bool) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(force)
            .v(true)
            .build();
        match self
            .call(
                Op::Remove,
                id.as_str(),
                API_CALL_TIMEOUT,
                self.docker.remove_container(id.as_str(), Some(options)),
            )
            .await
        {
            // Already gone, or already being removed by an earlier call: the goal is reached.
            Err(RuntimeError::NotFound { .. }) => Ok(()),
            Err(RuntimeError::Conflict { message, .. })
                if message.contains("already in progress") =>
            {
                Ok(())
            }
            other => other,
        }
    }

    async fn inspect_state(
        &self,
        id: &ContainerId,
    ) -> Result<Option<ContainerState>, RuntimeError> {
        let options = InspectContainerOptionsBuilder::new().size(false).build();
        let response = match self
            .call(
                Op::Inspect,
                id.as_str(),
                API_CALL_TIMEOUT,
                self.docker.inspect_container(id.as_str(), Some(options)),
            )
            .await
        {
            Ok(response) => response,
            Err(RuntimeError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let state = response.state.unwrap_or_default();
        let status = ContainerStatus::from_inspect(state.status);
        let exited = matches!(status, ContainerStatus::Exited | ContainerStatus::Dead);
        Ok(Some(ContainerState {
            status,
            running: state.running.unwrap_or(false),
            exit_code: if exited { state.exit_code } else { None },
            oom_killed: state.oom_killed.unwrap_or(false),
        }))
    }

    async fn list_mandelboxes(&self) -> Result<Vec<MandelboxContainer>, RuntimeError> {
        let filters = HashMap::from([("label", vec![managed_label_filter()])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self
            .call(
                Op::List,
                "",
                API_CALL_TIMEOUT,
                self.docker.list_containers(Some(options)),
            )
            .await?;
        let mut containers = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let labels: BTreeMap<String, String> =
                summary.labels.unwrap_or_default().into_iter().collect();
            // The engine filtered already; checking again costs nothing and guards the promise.
            if labels.get(LABEL_MANAGED).map(String::as_str) != Some(LABEL_MANAGED_VALUE) {
                continue;
            }
            let Some(id) = summary.id.and_then(|id| ContainerId::new(id).ok()) else {
                tracing::warn!("the Docker Engine listed a container without a valid id");
                continue;
            };
            let name = summary
                .names
                .unwrap_or_default()
                .into_iter()
                .next()
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default();
            containers.push(MandelboxContainer {
                id,
                name,
                status: ContainerStatus::from_summary(summary.state),
                labels,
                ports: summary_ports(summary.ports),
            });
        }
        Ok(containers)
    }

    fn events(&self) -> impl Stream<Item = Result<ContainerEvent, RuntimeError>> + Send + 'static {
        let filters = HashMap::from([
            ("type", vec!["container".to_owned()]),
            ("label", vec![managed_label_filter()]),
            (
                "event",
                EVENT_ACTIONS.iter().map(|a| (*a).to_owned()).collect(),
            ),
        ]);
        // bollard connects on the first poll; `since` makes the engine replay from its event
        // buffer (the last 256 events) whatever happened between this call and that poll. The
        // engine is on this host (a local socket), so its clock is ours.
        let options = EventsOptionsBuilder::new()
            .since(&events_since_now())
            .filters(&filters)
            .build();
        let socket = self.socket.clone();
        let mut failed = false;
        self.docker
            .events(Some(options))
            .take_while(move |item| {
                // Stop after the first error: the stream is broken from there on.
                let go_on = !failed;
                failed = failed || item.is_err();
                futures::future::ready(go_on)
            })
            .filter_map(move |item| {
                let mapped = match item {
                    Ok(message) => parse_event(&message).map(Ok),
                    Err(e) => Some(Err(map_error(Op::Events, "", &socket, &e))),
                };
                futures::future::ready(mapped)
            })
    }

    async fn find_image(&self, app: &str) -> Result<Option<String>, RuntimeError> {
        validate_app_pattern(app)?;
        let options = ListImagesOptionsBuilder::new().all(false).build();
        let images = self
            .call(
                Op::FindImage,
                app,
                API_CALL_TIMEOUT,
                self.docker.list_images(Some(options)),
            )
            .await?;
        let best = images
            .iter()
            .flat_map(|image| image.repo_tags.iter().map(move |tag| (image.created, tag)))
            .filter(|(_, tag)| image_matches_app(app, tag))
            // Newest first; among tags of one image, the shortest (then lexically first) name.
            .min_by(|(created_a, a), (created_b, b)| {
                created_b
                    .cmp(created_a)
                    .then(a.len().cmp(&b.len()))
                    .then(a.cmp(b))
            })
            .map(|(_, tag)| tag.clone());
        Ok(best)
    }

    async fn image_id(&self, reference: &str) -> Result<Option<String>, RuntimeError> {
        match self
            .call(
                Op::InspectImage,
                reference,
                API_CALL_TIMEOUT,
                self.docker.inspect_image(reference),
            )
            .await
        {
            Ok(image) => Ok(image.id),
            Err(RuntimeError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn data_root(&self) -> Result<Option<std::path::PathBuf>, RuntimeError> {
        let info = self
            .call(Op::Info, "", API_CALL_TIMEOUT, self.docker.info())
            .await?;
        Ok(info
            .docker_root_dir
            .filter(|dir| !dir.is_empty())
            .map(std::path::PathBuf::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_grace_rounds_up_and_is_clamped() {
        assert_eq!(stop_grace_seconds(Duration::ZERO), 0);
        assert_eq!(stop_grace_seconds(Duration::from_millis(1)), 1);
        assert_eq!(stop_grace_seconds(Duration::from_secs(10)), 10);
        assert_eq!(stop_grace_seconds(Duration::from_secs(10_000)), 600);
    }
}
