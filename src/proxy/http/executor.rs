//! Where hyper runs HTTP/2 streams: the application connection's streams run in the
//! connection's own task ([`ConnectionStreams`]); the passthrough's HTTP/2 client spawns
//! ([`BoxingExecutor`]).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};

/// Spawns each future boxed. Tokio keeps a task's future inline in the task and rewrites the
/// whole slot when the task finishes, so a future of several KiB cost a few KiB of memcpy per
/// task; boxed, the task holds a pointer.
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

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The streams of one application connection, polled by the connection's task.
///
/// hyper's HTTP/2 server hands each stream to its executor; spawned, each stream was a task of
/// its own: one task created per request, and each response a wake-up of the stream's task and
/// then one of the connection's, whose write to the application then held only the responses
/// ready at that moment. Here the connection's task polls its streams itself (in a
/// `FuturesUnordered`, which polls only the streams woken), so the responses readied in one
/// wake-up leave in one write. HTTP/1 never hands anything over: hyper drives its one request
/// inside the connection, and the set stays empty.
pub(crate) struct ConnectionStreams {
    handed_over: Arc<HandedOver>,
    running: FuturesUnordered<Isolated>,
}

/// Streams hyper handed over and the connection's task has not yet taken in.
#[derive(Default)]
struct HandedOver {
    /// Lets a poll skip the lock when nothing was handed over, as on every HTTP/1 poll.
    any: AtomicBool,
    streams: Mutex<Vec<Isolated>>,
}

/// The executor given to hyper: it hands each stream to the connection's [`ConnectionStreams`].
/// It wakes no one: hyper hands streams over only while the connection's task polls the
/// connection (a new stream) or a stream (an HTTP/2 upgrade's task), and `drive` takes them in
/// before it returns.
#[derive(Clone)]
pub(crate) struct StreamSpawner(Arc<HandedOver>);

impl<F> hyper::rt::Executor<F> for StreamSpawner
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let mut streams = self.0.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.push(Isolated(Box::pin(future)));
        self.0.any.store(true, Ordering::Release);
    }
}

/// A stream whose panic ends only that stream, as when it was a task of its own (tokio caught
/// it there): the connection and its other streams go on. The stream is dropped, which resets it.
struct Isolated(StreamFuture);

impl Future for Isolated {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let stream = &mut self.get_mut().0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| stream.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                tracing::error!("an HTTP/2 stream panicked; that stream is reset, its connection goes on");
                Poll::Ready(())
            }
        }
    }
}

impl ConnectionStreams {
    pub(crate) fn new() -> Self {
        Self { handed_over: Arc::default(), running: FuturesUnordered::new() }
    }

    pub(crate) fn spawner(&self) -> StreamSpawner {
        StreamSpawner(self.handed_over.clone())
    }

    /// Polls `connection` and the streams it hands over until `connection` ends; streams still
    /// running then stay here (see [`Self::finish`]).
    pub(crate) fn drive<'a, C: Future + ?Sized>(
        &'a mut self,
        mut connection: Pin<&'a mut C>,
    ) -> impl Future<Output = C::Output> + 'a {
        std::future::poll_fn(move |cx| {
            loop {
                if let Poll::Ready(output) = connection.as_mut().poll(cx) {
                    return Poll::Ready(output);
                }
                self.take_handed_over();
                self.poll_running(cx);
                // A stream can hand over one more (an HTTP/2 upgrade's task): poll again for it.
                if !self.handed_over.any.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
        })
    }

    /// Runs the streams left when the connection ended. Its end has reset them, so each ends
    /// at its next poll: as when each was a task of its own, none is dropped midway.
    pub(crate) async fn finish(mut self) {
        std::future::poll_fn(|cx| loop {
            self.take_handed_over();
            if self.running.is_empty() {
                return Poll::Ready(());
            }
            match self.running.poll_next_unpin(cx) {
                Poll::Ready(_) => continue,
                Poll::Pending => return Poll::Pending,
            }
        })
        .await;
    }

    fn take_handed_over(&mut self) {
        // A load first: the swap is a locked instruction, and HTTP/1 hands nothing over.
        if !self.handed_over.any.load(Ordering::Relaxed) || !self.handed_over.any.swap(false, Ordering::Acquire) {
            return;
        }
        let mut streams = self.handed_over.streams.lock().unwrap_or_else(PoisonError::into_inner);
        self.running.extend(streams.drain(..));
    }

    /// Polls the streams woken since the last poll; `FuturesUnordered` yields (waking the task)
    /// once it has polled as many as it holds, so one busy connection cannot hold its thread.
    fn poll_running(&mut self, cx: &mut Context<'_>) {
        // Empty (always, on HTTP/1), a poll would still register the task's waker.
        if self.running.is_empty() {
            return;
        }
        while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
    }
}

/// A stream handed over holds a [`StreamSpawner`], so one never taken in (the connection's task
/// dropped right after the hand-over) would keep `HandedOver` and itself alive: a cycle.
impl Drop for ConnectionStreams {
    fn drop(&mut self) {
        self.handed_over.streams.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn streams_run_in_the_connection_s_task_and_finish_after_it() {
        // In a task of its own: the test's body is not one, and has no task id.
        tokio::spawn(streams_run_in_the_task_that_drives_them()).await.unwrap();
    }

    async fn streams_run_in_the_task_that_drives_them() {
        let mut streams = ConnectionStreams::new();
        let spawner = streams.spawner();
        let task = tokio::task::id();
        let ran_here = Arc::new(AtomicUsize::new(0));
        let (release, released) = oneshot::channel::<()>();
        let (done, connection_done) = oneshot::channel::<()>();
        let connection = {
            let ran_here = ran_here.clone();
            async move {
                for _ in 0..3 {
                    let ran_here = ran_here.clone();
                    spawner.execute(async move {
                        tokio::task::yield_now().await;
                        assert_eq!(tokio::task::id(), task);
                        ran_here.fetch_add(1, Ordering::SeqCst);
                    });
                }
                // One stream outlives the connection: it waits for what the test sends later.
                spawner.execute(async move {
                    let _ = released.await;
                    assert_eq!(tokio::task::id(), task);
                });
                let _ = connection_done.await;
                "connection ended"
            }
        };
        tokio::pin!(connection);
        {
            let driving = streams.drive(connection.as_mut());
            tokio::pin!(driving);
            // The handed-over streams run while the connection is still pending.
            while ran_here.load(Ordering::SeqCst) < 3 {
                assert!(futures_util::poll!(driving.as_mut()).is_pending());
                tokio::task::yield_now().await;
            }
            let _ = done.send(());
            assert_eq!(driving.await, "connection ended");
        }
        assert_eq!(streams.running.len(), 1, "the stream still waiting is kept, not dropped");
        let _ = release.send(());
        streams.finish().await;
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        let mut streams = ConnectionStreams::new();
        let spawner = streams.spawner();
        let (ran, did_run) = oneshot::channel::<()>();
        spawner.execute(async move {
            tokio::task::yield_now().await;
            #[allow(clippy::panic)]
            {
                panic!("a bug in one stream");
            }
        });
        spawner.execute(async move {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            let _ = ran.send(());
        });
        let connection = did_run;
        tokio::pin!(connection);
        assert!(streams.drive(connection).await.is_ok(), "the other stream ran to its end");
        assert!(streams.running.is_empty());
    }

    #[tokio::test]
    async fn a_stream_handed_over_by_a_stream_is_run() {
        let mut streams = ConnectionStreams::new();
        let spawner = streams.spawner();
        let (ran, did_run) = oneshot::channel::<()>();
        spawner.clone().execute(async move {
            spawner.execute(async move {
                let _ = ran.send(());
            });
        });
        let connection = did_run;
        tokio::pin!(connection);
        assert!(streams.drive(connection).await.is_ok());
    }
}
