//! The executor hyper spawns HTTP/2 streams on (server side: one task per stream; client side:
//! one task per request body piped upstream).

use std::future::Future;

/// Spawns each future boxed. Tokio keeps a task's future inline in the task and rewrites the
/// whole slot when the task finishes, so a stream future of several KiB (hyper's stream state
/// around the request pipeline) cost a few KiB of memcpy per stream; boxed, the task holds a
/// pointer. HTTP/1.1 never spawns here: hyper drives its one request inline in the connection.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future));
    }
}
