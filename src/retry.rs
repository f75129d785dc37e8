//! [`RetryExhausted`]: a `tower::retry` policy that waits out [`Exhausted::retry_after`].

use std::time::Duration;

use http::Request;
use tokio::time::Sleep;
use tower::retry::Policy;

use crate::answer::Exhausted;
use crate::body::TryCloneBody;
use crate::error::BoxError;

/// A [`tower::retry::Policy`] for a stack with [`KeyFallbackLayer`] inside it: when no key
/// could serve a request ([`Exhausted`]) and a key is usable again within `max_wait`, it sleeps
/// until then and sends the request again; every other outcome is final.
///
/// - Only an [`Exhausted`] error is retried. A response (whatever its status), any other
///   error (a timeout outside the layer, a request the provider refused) and an
///   [`Exhausted`] whose [`retry_after`](Exhausted::retry_after) is `None` (every key is
///   disabled) or longer than `max_wait` are handed back as they are.
/// - At most `max_retries` retries per request.
/// - The wait is `tokio::time::sleep`, so it follows a paused clock in tests.
/// - The request is copied before it is sent ([`TryCloneBody`]); a request whose body cannot
///   be copied is sent once.
///
/// Put it **outside** the layer: inside, it would retry the same key. With
/// [`exhausted_response(true)`](crate::KeyFallbackBuilder::exhausted_response) the layer
/// answers 429 rather than failing, and this policy has nothing to retry.
///
/// [`KeyFallbackLayer`]: crate::KeyFallbackLayer
///
/// ```
/// use std::time::Duration;
/// use tower::retry::RetryLayer;
/// use tower::ServiceBuilder;
/// use tower_key_fallback::{KeyFallbackLayer, KeySet, RetryExhausted};
/// # let client = tower::service_fn(|_: http::Request<String>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// # });
///
/// let layer = KeyFallbackLayer::new(KeySet::new(["gsk_a", "gsk_b"])?);
/// let svc = ServiceBuilder::new()
///     // Outside: when every key is cooling, wait up to 20 s for one, twice at most.
///     .layer(RetryLayer::new(RetryExhausted::new(2, Duration::from_secs(20))))
///     .layer(layer)
///     // Inside: each attempt gets 30 s; a timeout moves the request to the next key.
///     .timeout(Duration::from_secs(30))
///     .service(client);
/// # Ok::<(), tower_key_fallback::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryExhausted {
    max_retries: u32,
    max_wait: Duration,
}

impl RetryExhausted {
    /// Retries at most `max_retries` times per request, each time only if a key is usable
    /// again within `max_wait`.
    pub fn new(max_retries: u32, max_wait: Duration) -> Self {
        RetryExhausted {
            max_retries,
            max_wait,
        }
    }

    /// Retries left for this request.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The longest wait for a key that is retried.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// How long to wait before retrying after `err`, or `None` when `err` is final.
    fn wait_for(&self, err: &BoxError) -> Option<Duration> {
        if self.max_retries == 0 {
            return None;
        }
        let wait = err.downcast_ref::<Exhausted>()?.retry_after()?;
        (wait <= self.max_wait).then_some(wait)
    }
}

impl<B, Res> Policy<Request<B>, Res, BoxError> for RetryExhausted
where
    B: TryCloneBody,
{
    type Future = Sleep;

    fn retry(
        &mut self,
        _req: &mut Request<B>,
        result: &mut Result<Res, BoxError>,
    ) -> Option<Self::Future> {
        let wait = self.wait_for(result.as_ref().err()?)?;
        self.max_retries -= 1;
        tracing::info!(
            wait_ms = wait.as_millis() as u64,
            retries_left = self.max_retries,
            "no API key could serve; waiting for one to retry"
        );
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        if self.max_retries == 0 {
            return None;
        }
        crate::body::try_clone_request(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exhausted(retry_after: Option<Duration>) -> BoxError {
        Box::new(Exhausted {
            retry_after,
            attempts: 2,
            keys: 2,
            last_response: None,
            last_error: None,
        })
    }

    #[test]
    fn only_a_bounded_exhaustion_is_retried() {
        let p = RetryExhausted::new(1, Duration::from_secs(10));
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(p.wait_for(&exhausted(secs(3))), secs(3));
        assert_eq!(p.wait_for(&exhausted(secs(10))), secs(10));
        assert_eq!(p.wait_for(&exhausted(secs(0))), secs(0));
        assert_eq!(p.wait_for(&exhausted(secs(11))), None);
        assert_eq!(p.wait_for(&exhausted(None)), None);
        assert_eq!(p.wait_for(&"connection refused".into()), None);
        let spent = RetryExhausted::new(0, Duration::from_secs(10));
        assert_eq!(spent.wait_for(&exhausted(secs(3))), None);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_counted_and_requests_copied() {
        let mut p = RetryExhausted::new(2, Duration::from_secs(10));
        let mut req = Request::post("http://127.0.0.1/")
            .header("x-tag", "t")
            .body(String::from("{}"))
            .unwrap();
        let copy = Policy::<_, (), _>::clone_request(&mut p, &req).unwrap();
        assert_eq!((copy.uri(), copy.body().as_str()), (req.uri(), "{}"));
        assert_eq!(copy.headers()["x-tag"], "t");
        let mut result: Result<(), BoxError> = Err(exhausted(Some(Duration::from_secs(3))));
        let start = tokio::time::Instant::now();
        p.retry(&mut req, &mut result).unwrap().await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(p.retry(&mut req, &mut result).is_some());
        assert!(p.retry(&mut req, &mut result).is_none());
        assert!(Policy::<_, (), _>::clone_request(&mut p, &req).is_none());
        let mut ok: Result<(), BoxError> = Ok(());
        assert!(RetryExhausted::new(2, Duration::MAX)
            .retry(&mut req, &mut ok)
            .is_none());
    }
}
