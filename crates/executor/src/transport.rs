//! Docker Engine API client (bollard) whose every HTTP connection is an SSH channel opened
//! by the connector: a socket forward or a `dial-stdio` command on the instance.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bollard::{API_DEFAULT_VERSION, BollardRequest, Docker};
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection as HyperConnection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use podfleet_connector::{ConnectError, Connection, Tunnel, TunnelStream};

/// Fake host name in request URIs; the real route is the SSH channel (as gitlab-runner's
/// `internal.tunnel.invalid`).
const TUNNEL_HOST: &str = "http://podfleet.tunnel.invalid";

/// Seconds bollard waits for one API call; long calls (logs, wait) stream past it.
const REQUEST_TIMEOUT_SECS: u64 = 3600;

/// Opens one SSH channel per HTTP connection.
#[derive(Clone)]
struct TunnelConnector {
    connection: Connection,
    tunnel: Tunnel,
}

impl tower_service::Service<Uri> for TunnelConnector {
    type Response = TunnelIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TunnelIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let stream = this.connection.open_tunnel(&this.tunnel).await?;
            Ok(TunnelIo(TokioIo::new(stream)))
        })
    }
}

/// An SSH channel as hyper IO.
struct TunnelIo(TokioIo<TunnelStream>);

impl HyperConnection for TunnelIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A bollard client that reaches the instance's engine through `tunnel` over `connection`.
pub fn docker_over_ssh(
    connection: Connection,
    tunnel: Tunnel,
) -> Result<Docker, bollard::errors::Error> {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(8)
        .build(TunnelConnector { connection, tunnel });
    let transport = move |request: BollardRequest| {
        let client = client.clone();
        async move { Ok(client.request(request).await?) }
    };
    Docker::connect_with_custom_transport(
        transport,
        Some(TUNNEL_HOST),
        REQUEST_TIMEOUT_SECS,
        API_DEFAULT_VERSION,
    )
}
