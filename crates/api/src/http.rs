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

/// Parses the request at the start of `input`: `Ok(None)` while more bytes are needed.
pub fn parse(input: &[u8], limits: &Limits) -> Result<Option<HttpRequest>, HttpError> {
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
        Ok(httparse::Status::Partial) => return Ok(None),
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
        return Ok(None);
    }
    let keep_alive = match (version, connection.as_deref()) {
        (_, Some("close")) => false,
        (0, Some("keep-alive")) => true,
        (0, _) => false,
        _ => true,
    };
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Ok(Some(HttpRequest {
        method: method.to_string(),
        path: path.to_string(),
        body: input[header_length..length].to_vec(),
        keep_alive,
        length,
    }))
}

/// A response's bytes: a JSON `body` if any, `Connection: close` when `close`, and the
/// methods a path allows for a 405.
pub fn response(status: u16, body: Option<&str>, close: bool, allow: Option<&str>) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {}\r\nServer: warden\r\n", reason(status));
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

/// A one-line JSON error body: `{"error":"..."}`.
pub fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}
