//! A scripted HTTP server for client tests: answers each request with the next scripted reply
//! and records every request for later assertions.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, e.g. `/api/v4/jobs/10/trace?debug_trace=false`.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub received_at: std::time::Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn json(self, body: &str) -> Self {
        let mut reply = self.header("content-type", "application/json");
        reply.body = body.as_bytes().to_vec();
        reply
    }
}

#[derive(Default)]
struct Script {
    replies: VecDeque<Reply>,
    requests: Vec<Recorded>,
}

pub struct ScriptedServer {
    pub url: String,
    script: Arc<Mutex<Script>>,
}

impl ScriptedServer {
    pub async fn start(replies: Vec<Reply>) -> Self {
        let script = Arc::new(Mutex::new(Script {
            replies: replies.into(),
            requests: Vec::new(),
        }));
        let shared = Arc::clone(&script);
        let router = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let shared = Arc::clone(&shared);
                async move {
                    let mut script = shared.lock().expect("script lock");
                    script.requests.push(Recorded {
                        method: method.to_string(),
                        path: uri
                            .path_and_query()
                            .map(|path| path.to_string())
                            .unwrap_or_default(),
                        headers,
                        body: body.to_vec(),
                        received_at: std::time::Instant::now(),
                    });
                    // Unscripted requests get 400 (not retried) so tests notice them.
                    let reply = script.replies.pop_front().unwrap_or_else(|| {
                        Reply::status(400).json(r#"{"message":"unscripted request"}"#)
                    });
                    let mut response = Response::builder()
                        .status(StatusCode::from_u16(reply.status).expect("valid status"));
                    for (name, value) in &reply.headers {
                        response = response.header(name, value);
                    }
                    response
                        .body(Body::from(reply.body))
                        .expect("valid response")
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("local address");
        tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("scripted server runs");
        });
        ScriptedServer {
            url: format!("http://{address}/"),
            script,
        }
    }

    pub fn push(&self, reply: Reply) {
        self.script
            .lock()
            .expect("script lock")
            .replies
            .push_back(reply);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.script.lock().expect("script lock").requests.clone()
    }

    pub fn unused_replies(&self) -> usize {
        self.script.lock().expect("script lock").replies.len()
    }

    /// Polls until at least `count` requests arrived (fails after 10 s).
    pub async fn wait_for_requests(&self, count: usize) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let requests = self.requests();
            if requests.len() >= count {
                return requests;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {count} requests, got {}: {:#?}",
                requests.len(),
                requests
                    .iter()
                    .map(|r| (&r.method, &r.path))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
