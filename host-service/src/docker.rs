//! Docker: the engine that runs mandelboxes.
//!
//! [`ContainerRuntime`] is the narrow surface the mandelbox lifecycle needs: create, start, stop
//! and remove a container, read its state, list the ones we own, follow their events and find
//! the local image of an app. [`DockerRuntime`] implements it with bollard over the local socket
//! and is tested against the real engine (`tests/docker.rs`); [`FakeRuntime`] is a stateful
//! in-memory stand-in for the lifecycle's tests that can inject the next error of any operation.
//!
//! Ownership is by label: every container created through [`ContainerRuntime::create`] carries
//! [`LABEL_MANAGED`]`=`[`LABEL_MANAGED_VALUE`], and [`ContainerRuntime::list_mandelboxes`] and
//! [`ContainerRuntime::events`] see only those, so a restarted host service can find (and adopt
//! or clean) what it started before, and never touches anything else on the host.
//!
//! Everything here is idempotent where Docker allows it: removing a container that is gone and
//! stopping one that is stopped or gone both succeed, and inspecting one that is gone answers
//! `None`.
//!
//! One module per job: [`errors`](RuntimeError), ids ([`ContainerId`]), spec ([`ContainerSpec`],
//! its validation and create request), events (states and [`parse_event`]), images (which local
//! image runs an app), runtime (the [`ContainerRuntime`] trait), engine ([`DockerRuntime`]) and
//! fake ([`FakeRuntime`]).

mod engine;
mod errors;
mod events;
mod fake;
mod ids;
mod images;
mod runtime;
mod spec;

use std::time::Duration;

pub use engine::DockerRuntime;
pub use errors::{Op, RuntimeError};
pub use events::{
    ContainerEvent, ContainerEventKind, ContainerState, ContainerStatus, MandelboxContainer,
    parse_event,
};
pub use fake::{FakeContainer, FakeRuntime, SIGKILL_EXIT_CODE, SIGTERM_EXIT_CODE};
pub use ids::{ContainerId, InvalidContainerId};
pub use images::{CURRENT_BUILD_TAG, image_matches_app, validate_app_pattern};
pub use runtime::ContainerRuntime;
pub use spec::{BindMount, ContainerSpec, Device, Propagation, TmpfsMount};

/// Label on every container the host service creates; the filter for listing and events.
pub const LABEL_MANAGED: &str = "whist.managed";
/// The value of [`LABEL_MANAGED`].
pub const LABEL_MANAGED_VALUE: &str = "true";
/// The mandelbox a container runs (its `whist.mandelboxes.id`).
pub const LABEL_MANDELBOX_ID: &str = "whist.mandelbox.id";
/// The user the mandelbox was assigned to.
pub const LABEL_USER_ID: &str = "whist.user.id";
/// The client session the mandelbox serves.
pub const LABEL_SESSION_ID: &str = "whist.session.id";

/// The Docker Engine socket on a Linux host.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Deadline for one ordinary API call (create, start, inspect, list, remove, image list). Here
/// create takes 13–21 ms and start 170–225 ms, and 16 concurrent start-ups finish in about 2 s;
/// 30 s leaves room for a loaded host and for the nvidia runtime's hooks, and still fails a
/// spin-up instead of hanging it when the daemon is wedged.
pub const API_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to a stop's grace period for its deadline: after the grace the engine kills the
/// container and then still has to reap it and answer.
pub const STOP_TIMEOUT_MARGIN: Duration = Duration::from_secs(15);
/// Longest grace a stop may ask for; a longer request is clamped. A mandelbox that has not
/// exited ten minutes after SIGTERM will not exit on its own, and the drain must not wait longer.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(600);
/// bollard's own per-request timeout, which covers only the wait for response headers. It is a
/// backstop set above every deadline here (including the longest stop), because a stop's
/// headers arrive only once the container has stopped; the per-call deadlines are what fire.
const BOLLARD_BACKSTOP_TIMEOUT: Duration =
    Duration::from_secs(MAX_STOP_GRACE.as_secs() + STOP_TIMEOUT_MARGIN.as_secs() + 60);
/// Longest Docker object name or id we accept: ids are 64 hex characters, names far shorter.
const MAX_NAME_LEN: usize = 128;
