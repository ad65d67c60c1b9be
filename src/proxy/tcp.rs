//! The forward phase of a TCP service: connect (with one retry on another endpoint), then
//! copy both ways until both sides are done.

use tokio::net::TcpStream;

use super::conn::ConnCtx;
use super::copy;
use crate::metrics::metrics;
use crate::tls;
use crate::upstream::Connected;

pub(super) async fn forward(ctx: &mut ConnCtx, client: &mut TcpStream, timeouts: copy::FlowTimeouts) {
    let upstream = &ctx.route.upstream;
    // Boxed: the connect (and TLS handshake) state is large and only lives until connected;
    // inline, every open connection's task would keep room for it.
    let Connected { mut stream, target, active: _target_active, slot: _slot } =
        match Box::pin(upstream.connect(ctx.route.tls())).await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(peer = %ctx.peer, %error, "upstream connect failed; closing");
                ctx.outcome = "connect_failed";
                return;
            }
        };
    ctx.endpoint = Some(target.addr);
    let (bytes, result) = copy::bidirectional(client, &mut stream, timeouts).await;
    upstream.metrics.bytes_sent.inc_by(bytes.client_to_upstream);
    upstream.metrics.bytes_received.inc_by(bytes.upstream_to_client);
    upstream.metrics.bytes_spliced.inc_by(bytes.spliced);
    // TLS 1.3 servers reject a client certificate after the handshake: count it too.
    if let Some(reason) = result.as_ref().err().and_then(tls::reason_of_io) {
        metrics().tls_failure(upstream.service(), reason);
    }
    ctx.bytes = bytes;
    ctx.outcome = copy::outcome(&result);
}
