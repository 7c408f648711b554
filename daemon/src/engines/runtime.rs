//! The container runtimes of this node behind one small trait: the Docker
//! Engine API (bollard, version negotiated) and the CRI ImageService
//! (containerd, CRI-O) over its unix socket.
use std::{collections::BTreeSet, future::Future, path::PathBuf, pin::Pin, time::Duration};

use bollard::{query_parameters::ListImagesOptions, Docker};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{image_service_client::ImageServiceClient, ListImagesRequest};
use tonic::transport::{Endpoint, Uri};

use super::image_ref::{normalize, ImageKey};

/// Answers slower than this count as the runtime being unavailable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("no socket at {0}")]
    NoSocket(PathBuf),
    #[error("no answer within {CALL_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Call(String),
}

/// A runtime is installed when its socket is a socket. A hostPath mount of a
/// missing socket leaves an empty directory in its place on nodes without
/// that runtime: that means absent, not down.
fn is_socket(p: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

pub type ListFuture<'a> = Pin<Box<dyn Future<Output = Result<BTreeSet<ImageKey>, RuntimeError>> + Send + 'a>>;

/// A runtime that can say which images it holds.
pub trait ImageRuntime: Send + Sync {
    /// `docker` or `cri`.
    fn kind(&self) -> &'static str;
    fn socket(&self) -> &PathBuf;
    /// Every name (tags and digests) of every image, normalised.
    fn list(&self) -> ListFuture<'_>;
}

fn keys<'a>(names: impl Iterator<Item = &'a String>) -> BTreeSet<ImageKey> {
    // `<none>:<none>` and other unparsable names name nothing useful.
    names.filter_map(|n| normalize(n).ok()).collect()
}

async fn timed<T>(f: impl Future<Output = Result<T, RuntimeError>>) -> Result<T, RuntimeError> {
    tokio::time::timeout(CALL_TIMEOUT, f).await.unwrap_or(Err(RuntimeError::Timeout))
}

/// Where the Docker Engine API answers: a unix socket, or a TCP address
/// (DOCKER_HOST=tcp://..., which the original's Docker client honoured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerEndpoint {
    Unix(PathBuf),
    Http(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DOCKER_HOST {0:?} is neither unix:///path nor tcp://host:port")]
pub struct DockerHostError(pub String);

impl DockerEndpoint {
    /// Reads a DOCKER_HOST value the way Docker's clients do.
    pub fn from_docker_host(v: &str) -> Result<Self, DockerHostError> {
        let bad = || DockerHostError(v.to_owned());
        if let Some(path) = v.strip_prefix("unix://") {
            return if path.starts_with('/') { Ok(Self::Unix(PathBuf::from(path))) } else { Err(bad()) };
        }
        let rest = v.strip_prefix("tcp://").or_else(|| v.strip_prefix("http://")).ok_or_else(bad)?;
        if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
            return Err(bad());
        }
        Ok(Self::Http(format!("http://{}", rest.trim_end_matches('/'))))
    }
}

pub struct DockerRuntime {
    endpoint: DockerEndpoint,
    /// The socket path, or the URL, as shown.
    label: PathBuf,
}

impl DockerRuntime {
    pub fn new(endpoint: DockerEndpoint) -> Self {
        let label = match &endpoint {
            DockerEndpoint::Unix(p) => p.clone(),
            DockerEndpoint::Http(url) => PathBuf::from(url),
        };
        Self { endpoint, label }
    }

    /// A client with the API version negotiated (dockerd 20.10 refuses paths
    /// newer than its 1.41).
    pub async fn client(&self) -> Result<Docker, RuntimeError> {
        let docker = match &self.endpoint {
            DockerEndpoint::Unix(socket) => {
                if !is_socket(socket) {
                    return Err(RuntimeError::NoSocket(socket.clone()));
                }
                Docker::connect_with_socket(
                    &socket.to_string_lossy(),
                    CALL_TIMEOUT.as_secs(),
                    bollard::API_DEFAULT_VERSION,
                )
            }
            DockerEndpoint::Http(url) => {
                Docker::connect_with_http(url, CALL_TIMEOUT.as_secs(), bollard::API_DEFAULT_VERSION)
            }
        }
        .map_err(|e| RuntimeError::Call(e.to_string()))?;
        timed(async { docker.negotiate_version().await.map_err(|e| RuntimeError::Call(e.to_string())) }).await
    }
}

impl ImageRuntime for DockerRuntime {
    fn kind(&self) -> &'static str {
        "docker"
    }
    fn socket(&self) -> &PathBuf {
        &self.label
    }
    fn list(&self) -> ListFuture<'_> {
        Box::pin(async move {
            let docker = self.client().await?;
            let opts = ListImagesOptions { all: false, ..Default::default() };
            let images =
                timed(async { docker.list_images(Some(opts)).await.map_err(|e| RuntimeError::Call(e.to_string())) })
                    .await?;
            Ok(keys(images.iter().flat_map(|i| i.repo_tags.iter().chain(i.repo_digests.iter()))))
        })
    }
}

pub struct CriRuntime {
    socket: PathBuf,
}

impl CriRuntime {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }
}

impl ImageRuntime for CriRuntime {
    fn kind(&self) -> &'static str {
        "cri"
    }
    fn socket(&self) -> &PathBuf {
        &self.socket
    }
    fn list(&self) -> ListFuture<'_> {
        Box::pin(async move {
            if !is_socket(&self.socket) {
                return Err(RuntimeError::NoSocket(self.socket.clone()));
            }
            let path = self.socket.clone();
            timed(async move {
                // The URI is a placeholder: the connector dials the socket.
                let channel =
                    Endpoint::from_static("http://[::]:0")
                        .connect_with_connector(tower::service_fn(move |_: Uri| {
                            let path = path.clone();
                            async move {
                                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                            }
                        }))
                        .await
                        .map_err(|e| RuntimeError::Call(format!("connecting: {e}")))?;
                let mut client = ImageServiceClient::new(channel);
                let resp = client
                    .list_images(ListImagesRequest { filter: None })
                    .await
                    .map_err(|e| RuntimeError::Call(format!("ListImages: {}", e.message())))?;
                let images = resp.into_inner().images;
                Ok(keys(images.iter().flat_map(|i| i.repo_tags.iter().chain(i.repo_digests.iter()))))
            })
            .await
        })
    }
}

#[cfg(test)]
mod docker_host_tests {
    use super::*;

    #[test]
    fn docker_host_forms() {
        assert_eq!(
            DockerEndpoint::from_docker_host("unix:///run/user/docker.sock"),
            Ok(DockerEndpoint::Unix("/run/user/docker.sock".into()))
        );
        assert_eq!(
            DockerEndpoint::from_docker_host("tcp://127.0.0.1:2375"),
            Ok(DockerEndpoint::Http("http://127.0.0.1:2375".into()))
        );
        for bad in ["", "unix://relative", "ssh://host", "npipe:////./pipe/docker_engine", "tcp://"] {
            assert!(DockerEndpoint::from_docker_host(bad).is_err(), "{bad}");
        }
    }
}
