//! The contention rounds: tasks on a multi-thread tokio runtime, each sending requests
//! through its own service.
#![allow(dead_code)]

use std::hint::black_box;
use std::time::Duration;

use http::Response;
use tower::{Service, ServiceExt};

use super::{request, Req};

/// Tasks per round, and requests per task.
pub const TASKS: usize = 64;
pub const PER_TASK: usize = 256;

/// Requests per round, for `Throughput::Elements`.
pub const PER_ROUND: u64 = (TASKS * PER_TASK) as u64;

/// One round: task `i` sends `PER_TASK` requests through `services[i]` (clones of one
/// service, or services of their own). Requests are built inside the tasks, on the worker
/// threads, so every thread count pays the same per-request construction.
async fn round<S, ResB>(services: Vec<S>)
where
    S: Service<Req, Response = Response<ResB>> + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
    ResB: Send + 'static,
{
    let tasks: Vec<_> = services
        .into_iter()
        .map(|mut svc| {
            tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    let req = request();
                    let res = svc
                        .ready()
                        .await
                        .expect("ready")
                        .call(req)
                        .await
                        .expect("answer");
                    drop(black_box(res));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task finished");
    }
}

/// Times rounds on `rt`. `services` holds one service per task; each round gets clones.
///
/// The round is itself spawned, so spawning and joining stay on the workers: awaiting 64
/// join handles from the bencher's thread adds 64 cross-thread wake-ups per round, a cost one
/// worker pays alone and two share, which flatters the scaling.
pub fn bench_rounds<S, ResB>(
    b: &mut criterion::Bencher<'_>,
    rt: &tokio::runtime::Runtime,
    services: &[S],
) where
    S: Service<Req, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
    ResB: Send + 'static,
{
    assert_eq!(services.len(), TASKS);
    b.iter(|| {
        let round = rt.spawn(round(services.to_vec()));
        rt.block_on(async {
            // Bounded in time as well as in count: a round takes milliseconds.
            tokio::time::timeout(Duration::from_secs(60), round)
                .await
                .expect("a round finishes within a minute")
                .expect("the round did not panic")
        })
    });
}

/// A multi-thread runtime with `threads` workers.
pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_time()
        .build()
        .expect("runtime")
}

/// `TASKS` clones of one service.
pub fn shared<S: Clone>(svc: S) -> Vec<S> {
    vec![svc; TASKS]
}
