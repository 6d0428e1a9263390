//! Walking an error's chain of causes: the outermost message alone often hides what failed
//! (a refused connection under a TLS error under a request error).

/// An error and its causes, outermost first.
pub fn causes<'a>(err: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

/// The messages of an error and its causes, joined with `: `.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    causes(err).map(ToString::to_string).collect::<Vec<_>>().join(": ")
}
