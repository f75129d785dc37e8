//! Reading a bounded prefix of an error body, for a bounded time, to classify it; and
//! recording what was read if the request is dropped mid-read.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::body::{BoxedBody, Buffered, Peek};
use crate::classify::Verdict;
use crate::driver::Driver;
use crate::driver::Shared;

/// An error body being read to classify it. If it is dropped before it was classified (the
/// caller gave up on the request mid-read), the key still gets the verdict that the head and
/// the bytes read so far support.
pub(crate) struct Inspection {
    shared: Arc<Shared>,
    driver: Driver,
    /// The response head and the read; taken when the inspection is finished.
    reading: Option<(http::response::Parts, Peek)>,
}

impl Inspection {
    pub(crate) fn new(
        shared: &Arc<Shared>,
        driver: Driver,
        parts: http::response::Parts,
        body: BoxedBody,
    ) -> Inspection {
        let peek = Peek::new(
            body,
            shared.config.inspect_limit,
            shared.config.inspect_timeout,
        );
        Inspection {
            shared: shared.clone(),
            driver,
            reading: Some((parts, peek)),
        }
    }

    /// Reads until the inspection limit, the end of the body, or the inspection timeout.
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.reading {
            Some((_, peek)) => peek.poll_peek(cx),
            None => Poll::Ready(()),
        }
    }

    /// The verdict on what was read, and the response with every byte, read or not. The
    /// verdict is not recorded here: the caller does.
    /// The verdict, the response, and the request's driver back.
    pub(crate) fn finish(mut self) -> (Verdict, http::Response<Buffered>, Driver) {
        let (parts, peek) = self.reading.take().expect("an inspection is finished once");
        let verdict = verdict(&self.shared, &parts, &peek);
        let res = http::Response::from_parts(parts, peek.into_buffered());
        let driver = std::mem::replace(&mut self.driver, Driver::done());
        (verdict, res, driver)
    }
}

fn verdict(shared: &Shared, parts: &http::response::Parts, peek: &Peek) -> Verdict {
    shared
        .classifier
        .classify_body(parts.status, &parts.headers, peek.prefix())
}

impl Drop for Inspection {
    fn drop(&mut self) {
        if let Some((parts, peek)) = self.reading.take() {
            let verdict = verdict(&self.shared, &parts, &peek);
            self.driver
                .record(&self.shared, parts.status.as_u16(), &parts.headers, verdict);
        }
    }
}
