//! Just enough HTTP/1.1 for a local control API and a metrics scrape: one
//! request per connection, no request bodies, `Connection: close`.
//!
//! A full HTTP stack would be a large dependency for two endpoints that only
//! local tools and Prometheus call.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest request head accepted; the API has no use for more.
const MAX_HEAD: usize = 16 * 1024;
/// A client that has not sent its request by then is dropped.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The parts of a request the API looks at.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    pub path: String,
}

/// Reads a request head (up to the blank line).
pub(crate) async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Request> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the request ended",
            ));
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(path), Some(v)) if v.starts_with("HTTP/1.") => Ok(Request {
            method: method.to_owned(),
            // The query string is not used by any endpoint.
            path: path.split('?').next().unwrap_or(path).to_owned(),
        }),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP request line: {line:?}"),
        )),
    }
}

/// Writes a whole response and shuts the write side down.
pub(crate) async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.shutdown().await
}

/// Client side: sends `METHOD path` and returns (status, body).
pub(crate) async fn call<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    method: &str,
    path: &str,
) -> io::Result<(u16, String)> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: nsproxy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "incomplete HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_and_response_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let req = read_request(&mut b).await.unwrap();
            assert_eq!(
                req,
                Request {
                    method: "GET".into(),
                    path: "/status".into()
                }
            );
            respond(&mut b, 200, "application/json", b"{}")
                .await
                .unwrap();
        });
        assert_eq!(
            call(&mut a, "GET", "/status?x=1").await.unwrap(),
            (200, "{}".into())
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(b"hello there\r\n\r\n").await.unwrap();
        assert!(read_request(&mut b).await.is_err());
    }
}
