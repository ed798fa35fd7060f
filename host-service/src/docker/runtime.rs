//! The narrow trait the mandelbox lifecycle drives the engine through.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures::Stream;

use super::{
    ContainerEvent, ContainerId, ContainerSpec, ContainerState, MandelboxContainer, RuntimeError,
};

/// The engine that runs mandelboxes. Implemented by [`DockerRuntime`] (the real engine) and
/// [`FakeRuntime`] (in memory, for the lifecycle's tests).
///
/// Every method is bounded in time: an implementation answers or fails within its deadline.
pub trait ContainerRuntime: Send + Sync {
    /// Creates a container from `spec` (after [`ContainerSpec::validate`]), labelled
    /// [`LABEL_MANAGED`]. A taken name is [`RuntimeError::Conflict`]; a missing image
    /// [`RuntimeError::NotFound`].
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<ContainerId, RuntimeError>> + Send;

    /// Starts a created (or exited) container; starting a running one succeeds.
    fn start(&self, id: &ContainerId) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Sends SIGTERM, then SIGKILL after `grace` (whole seconds, rounded up; at most
    /// [`MAX_STOP_GRACE`]). Stopping a stopped or missing container succeeds.
    fn stop(
        &self,
        id: &ContainerId,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Removes a container (with its anonymous volumes); `force` kills a running one first.
    /// Removing a missing container succeeds: it is already gone.
    fn remove(
        &self,
        id: &ContainerId,
        force: bool,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// The container's state, or `None` when it does not exist.
    fn inspect_state(
        &self,
        id: &ContainerId,
    ) -> impl Future<Output = Result<Option<ContainerState>, RuntimeError>> + Send;

    /// Every container labelled [`LABEL_MANAGED`], in any state; nothing else.
    fn list_mandelboxes(
        &self,
    ) -> impl Future<Output = Result<Vec<MandelboxContainer>, RuntimeError>> + Send;

    /// Start, die, oom and destroy events of containers labelled [`LABEL_MANAGED`], from the
    /// moment of this call (events between the call and the first poll are not lost). The
    /// stream ends after yielding an error (e.g. the daemon restarted): open a new one and
    /// reconcile with [`list_mandelboxes`](Self::list_mandelboxes), since events in between are
    /// not replayed.
    fn events(&self) -> impl Stream<Item = Result<ContainerEvent, RuntimeError>> + Send + 'static;

    /// The newest local image tagged `<app>:current-build` (see [`image_matches_app`]), e.g.
    /// `whist/browsers/chrome:current-build` for `browsers/chrome`; `None` when there is none.
    fn find_image(
        &self,
        app: &str,
    ) -> impl Future<Output = Result<Option<String>, RuntimeError>> + Send;

    /// The id (`sha256:…`) of the local image that `reference` (a tag) names now; `None` when
    /// there is none. A new image under the same tag has another id.
    fn image_id(
        &self,
        reference: &str,
    ) -> impl Future<Output = Result<Option<String>, RuntimeError>> + Send;

    /// The engine's data root (`docker info`'s `DockerRootDir`, e.g. `/var/lib/docker`), where
    /// images and container layers live; `None` when the engine does not say. Also the host's
    /// probe of the engine: an answer within the deadline means the engine is up.
    fn data_root(&self) -> impl Future<Output = Result<Option<PathBuf>, RuntimeError>> + Send;
}
