//! HTTP/1.1 framing: a request parsed from the bytes a client sent so far (with `httparse`),
//! within fixed limits, and a response's bytes.

use crate::server::Limits;

/// Most header lines a request may have.
const MAX_HEADERS: usize = 32;

/// One complete request.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    /// The path, without any query string.
    pub path: String,
    pub body: Vec<u8>,
    /// Whether the client keeps the connection for another request.
    pub keep_alive: bool,
    /// How many bytes of the input the request took.
    pub length: usize,
}

/// A request that cannot be served: the status to answer with, and why. The connection is
/// closed after the answer, since where the next request would start is unknown.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

/// What the bytes at the start of the input hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed; `wants_continue` once the headers are in, asked for
    /// `Expect: 100-continue`, and the body is still to come.
    Partial {
        wants_continue: bool,
    },
    Complete(HttpRequest),
}

/// Parses the request at the start of `input`.
pub fn parse(input: &[u8], limits: &Limits) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let too_large = || {
        HttpError::new(
            431,
            format!(
                "request headers exceed {} bytes or {MAX_HEADERS} lines",
                limits.max_header_bytes
            ),
        )
    };
    let header_length = match request.parse(input) {
        Ok(httparse::Status::Complete(n)) if n > limits.max_header_bytes => return Err(too_large()),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() > limits.max_header_bytes => {
            return Err(too_large())
        }
        Ok(httparse::Status::Partial) => {
            return Ok(Parsed::Partial {
                wants_continue: false,
            })
        }
        Err(httparse::Error::TooManyHeaders) => return Err(too_large()),
        Err(err) => return Err(HttpError::new(400, format!("malformed request: {err}"))),
    };
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HttpError::new(400, "malformed request line"));
    };
    let mut content_length = 0usize;
    let mut connection = None;
    let mut expect_continue = false;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value).map(str::trim);
        if header.name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| HttpError::new(400, "Content-Length is not a number"))?;
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::new(
                411,
                "chunked bodies are not supported: send Content-Length",
            ));
        } else if header.name.eq_ignore_ascii_case("connection") {
            connection = value.ok().map(str::to_ascii_lowercase);
        } else if header.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.is_ok_and(|v| v.eq_ignore_ascii_case("100-continue"));
        }
    }
    if content_length > limits.max_body_bytes {
        return Err(HttpError::new(
            413,
            format!(
                "request body of {content_length} bytes exceeds {} bytes",
                limits.max_body_bytes
            ),
        ));
    }
    let length = header_length + content_length;
    if input.len() < length {
        return Ok(Parsed::Partial {
            wants_continue: expect_continue,
        });
    }
    let keep_alive = match (version, connection.as_deref()) {
        (_, Some("close")) => false,
        (0, Some("keep-alive")) => true,
        (0, _) => false,
        _ => true,
    };
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Ok(Parsed::Complete(HttpRequest {
        method: method.to_string(),
        path: path.to_string(),
        body: input[header_length..length].to_vec(),
        keep_alive,
        length,
    }))
}

/// A response's bytes: a JSON `body` if any, `Connection: close` when `close`, and the
/// method a path takes when it was called with another.
///
/// The status line is `HTTP/1.1 200 ` with an empty reason phrase, as Cloud Hypervisor's
/// server writes it: its client, `ch-remote`, reads everything after `HTTP/1.1 ` up to the
/// end of the line as the number, and fails on a reason phrase. HTTP/1.1 allows an empty one (RFC 9112 §4).
pub fn response(status: u16, body: Option<&str>, close: bool, allow: Option<&str>) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} \r\nServer: warden\r\n");
    if let Some(allow) = allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    match body {
        Some(body) => head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        // A 204 has no body, hence no Content-Length either.
        None if status == 204 => head.push_str("\r\n"),
        None => head.push_str("Content-Length: 0\r\n\r\n"),
    }
    head.into_bytes()
}

/// A one-line JSON error body as Cloud Hypervisor sends one: an array of messages, from the
/// outermost to the root cause (`["..."]`), which its client prints as it is.
pub fn error_body(message: &str) -> String {
    serde_json::json!([message]).to_string()
}

/// The interim answer to a request that asked whether to send its body
/// (`Expect: 100-continue`).
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 \r\n\r\n";
