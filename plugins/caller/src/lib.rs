//! Test fixture `caller`: GETs the URL in the delivery's body through the
//! SDK's HTTP helper and publishes the response body to routing key
//! `routing-key` (host config; default `caller.out`) with
//! its status in header `x-status`. A redirect is followed once, by the
//! guest (the host never follows one), so the target meets the grants
//! again. A refused call rejects the delivery with the host's reason (it
//! names the rule); 429 and 503 retry after their `Retry-After`. Its
//! manifest asks for two origins that the outbound tests point at a
//! loopback and a metadata address. With host config `via = "wasi-http"`
//! it makes the calls through the standard `wasi:http/outgoing-handler`
//! instead (no redirect following, no retry-after).

use warren_sdk::{Delivery, HandleError, Manifest, Message, Plugin, Subscription, http};

struct Caller;

impl Plugin for Caller {
    fn manifest() -> Manifest {
        Manifest::new("caller", env!("CARGO_PKG_VERSION"))
            .subscribe(Subscription::queue("fixture.caller"))
            .outbound("http://loop.test:8080")
            .outbound("http://meta.test:8080")
    }

    fn handle(d: Delivery) -> Result<(), HandleError> {
        let url = String::from_utf8_lossy(&d.body).into_owned();
        let out = warren_sdk::config("routing-key").unwrap_or_else(|| "caller.out".into());
        if warren_sdk::config("via").as_deref() == Some("wasi-http") {
            let (status, body) = wasi_get(&url).map_err(HandleError::reject)?;
            let msg = Message::new("", &out, body).header("x-status", &status.to_string());
            warren_sdk::publish(msg)?;
            return Ok(());
        }
        let mut resp = http::get(&url).send()?;
        if (300..400).contains(&resp.status)
            && let Some(next) = resp.header("location").map(str::to_owned)
        {
            resp = http::get(&next).send()?;
        }
        let resp = resp.retry_if_busy()?;
        let mut msg =
            Message::new("", &out, resp.body.clone()).header("x-status", &resp.status.to_string());
        // A secret read through wasi:config/store, sent on as the call's
        // proof that it arrived (tests only: a real plugin never publishes
        // one).
        if let Some(token) = warren_sdk::secret("token").map_err(HandleError::retry)? {
            msg = msg.header("x-token-length", &token.len().to_string());
        }
        warren_sdk::publish(msg)?;
        Ok(())
    }
}

/// GET `url` through `wasi:http/outgoing-handler`: status and body.
fn wasi_get(url: &str) -> Result<(u16, Vec<u8>), String> {
    use warren_sdk::bindings::wasi::http::outgoing_handler;
    use warren_sdk::bindings::wasi::http::types::{Fields, Method, OutgoingRequest, Scheme};
    use warren_sdk::bindings::wasi::io::streams::StreamError;

    let (scheme, rest) = url.split_once("://").ok_or("URL has no scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let req = OutgoingRequest::new(Fields::new());
    let scheme = if scheme == "https" {
        Scheme::Https
    } else {
        Scheme::Http
    };
    let set = |ok: Result<(), ()>, what: &str| ok.map_err(|()| format!("invalid {what}"));
    set(req.set_method(&Method::Get), "method")?;
    set(req.set_scheme(Some(&scheme)), "scheme")?;
    set(req.set_authority(Some(authority)), "authority")?;
    set(req.set_path_with_query(Some(path)), "path")?;
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let resp = pending
        .get()
        .ok_or("no response")?
        .map_err(|()| "response taken twice")?
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let body = resp.consume().map_err(|()| "no body")?;
    let stream = body.stream().map_err(|()| "no body stream")?;
    let mut out = Vec::new();
    loop {
        match stream.blocking_read(64 << 10) {
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(e) => return Err(format!("{e:?}")),
        }
    }
    Ok((status, out))
}

warren_sdk::export_plugin!(Caller);
