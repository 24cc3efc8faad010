//! Helpers shared by the XA helper tests.

use std::time::{Duration, Instant};

/// Runs `call` until it ends or `limit` has passed, and drops it there;
/// whether it ended. Finer than a tokio timer (whose grain is 1 ms): it
/// polls until the instant.
pub async fn within(limit: Duration, call: impl Future<Output = ()>) -> bool {
    let deadline = Instant::now() + limit;
    let mut call = std::pin::pin!(call);
    std::future::poll_fn(|cx| {
        if call.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(true);
        }
        if Instant::now() >= deadline {
            return std::task::Poll::Ready(false);
        }
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}
