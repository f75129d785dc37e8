//! The fake provider's response body: one JSON document, or server-sent events sent one
//! frame at a time.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// The body of a [`FakeProvider`](super::FakeProvider) response.
///
/// An answer is one frame; a streamed answer is one frame per server-sent event
/// (`data: {…}\n\n`, ending with `data: [DONE]\n\n`), with a short pause between frames so
/// that each goes out as its own write.
///
/// ```
/// use http_body_util::BodyExt;
/// use tower_key_fallback::testing::FakeBody;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let body = FakeBody::from("{}");
/// assert_eq!(body.collect().await.unwrap().to_bytes(), "{}");
/// # }
/// ```
pub struct FakeBody {
    frames: VecDeque<Bytes>,
    stream: bool,
    interval: Duration,
    // Waiting before the next frame of a stream.
    pause: Option<Pin<Box<Sleep>>>,
    sent: bool,
}

impl FakeBody {
    pub(super) fn full(data: impl Into<Bytes>) -> FakeBody {
        let data = data.into();
        FakeBody {
            frames: if data.is_empty() {
                VecDeque::new()
            } else {
                VecDeque::from([data])
            },
            stream: false,
            interval: Duration::ZERO,
            pause: None,
            sent: false,
        }
    }

    pub(super) fn stream(events: Vec<Bytes>, interval: Duration) -> FakeBody {
        FakeBody {
            frames: events.into(),
            stream: true,
            interval,
            pause: None,
            sent: false,
        }
    }
}

impl From<&'static str> for FakeBody {
    fn from(s: &'static str) -> Self {
        FakeBody::full(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for FakeBody {
    fn from(s: String) -> Self {
        FakeBody::full(s)
    }
}

impl fmt::Debug for FakeBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeBody")
            .field("stream", &self.stream)
            .field("frames_left", &self.frames.len())
            .finish()
    }
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.frames.is_empty() {
            return Poll::Ready(None);
        }
        if this.sent && !this.interval.is_zero() {
            let pause = this
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.interval)));
            ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }
        this.sent = true;
        Poll::Ready(this.frames.pop_front().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.stream {
            // A stream's length is not announced: it goes out chunked, as Groq sends it.
            let mut hint = SizeHint::new();
            hint.set_lower(self.frames.iter().map(|f| f.len() as u64).sum());
            hint
        } else {
            SizeHint::with_exact(self.frames.iter().map(|f| f.len() as u64).sum())
        }
    }
}
