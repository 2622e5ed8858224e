//! Running a generator on several threads: one single-threaded runtime per
//! thread (the generators share `Rc` state within a thread, none across).

use std::io;

use tokio::runtime::Runtime;

/// Thread `t`'s share of `n` things split as evenly as possible over
/// `threads` threads.
pub fn share(n: usize, threads: usize, t: usize) -> usize {
    n / threads + usize::from(t < n % threads)
}

/// Runs each job on a thread of its own named `NAME-T`, giving it that
/// thread's runtime, and returns the results in job order. Every runtime
/// is built before any thread starts, so that none can fail while the
/// others wait for it at a barrier.
pub fn run<T, J>(name: &str, jobs: Vec<J>) -> io::Result<Vec<T>>
where
    T: Send + 'static,
    J: FnOnce(&Runtime) -> T + Send + 'static,
{
    let runtimes = jobs
        .iter()
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .collect::<io::Result<Vec<_>>>()?;
    let mut handles = Vec::with_capacity(jobs.len());
    for (t, (job, runtime)) in jobs.into_iter().zip(runtimes).enumerate() {
        handles.push(
            std::thread::Builder::new()
                .name(format!("{name}-{t}"))
                .spawn(move || job(&runtime))?,
        );
    }
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| io::Error::other(format!("a {name} thread panicked")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_even_and_add_up() {
        for (n, threads) in [(100, 1), (100, 3), (7, 4), (1000, 15), (3, 3)] {
            let shares: Vec<usize> = (0..threads).map(|t| share(n, threads, t)).collect();
            assert_eq!(shares.iter().sum::<usize>(), n);
            let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
            assert!(hi - lo <= 1, "{shares:?}");
        }
    }

    #[test]
    fn results_come_back_in_job_order() {
        let jobs: Vec<_> = (0..4)
            .map(|i| move |rt: &Runtime| rt.block_on(async move { i * 10 }))
            .collect();
        assert_eq!(run("test", jobs).unwrap(), [0, 10, 20, 30]);
    }
}
