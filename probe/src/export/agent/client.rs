//! `flowprobe query`: one GET to a running agent.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;

pub use super::http::encode;

/// A stuck agent should not hang a shell script forever.
const TIMEOUT: Duration = Duration::from_secs(30);

/// GETs `path_and_query` from the agent at `addr`; the body on 200, else an
/// error with the agent's one-line message.
pub fn get(addr: SocketAddr, path_and_query: &str) -> anyhow::Result<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the HTTP client")?;
    rt.block_on(async {
        tokio::time::timeout(TIMEOUT, fetch(addr, path_and_query))
            .await
            .map_err(|_| anyhow!("the agent at {addr} did not answer within {TIMEOUT:?}"))?
    })
}

async fn fetch(addr: SocketAddr, path_and_query: &str) -> anyhow::Result<Vec<u8>> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        anyhow!(
            "cannot reach the agent at {addr}: {e} (is `flowprobe run --listen {addr}` running?)"
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("talking HTTP to {addr}"))?;
    tokio::spawn(conn);
    let req = Request::get(path_and_query)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("asking the agent at {addr}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the agent's answer from {addr}"))?
        .to_bytes()
        .to_vec();
    if !status.is_success() {
        bail!(
            "the agent at {addr} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}
