use probe_common::ParseError;

/// What happened to every frame offered to the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames read from the source.
    pub frames: u64,
    /// Frames that parsed to a TCP/UDP connection.
    pub tracked: u64,
    /// Of those, frames not counted again: the same packet, seen before at
    /// another interface of the host, where its direction is counted
    /// (`probe_common::entry::DirState::claim`).
    pub duplicate: u64,
    /// Frames on interfaces whose link type flowprobe does not parse.
    pub unsupported_link: u64,
    /// Frames that did not, by [`ParseError`] (indexed by its discriminant).
    pub skipped: [u64; ParseError::COUNT],
}

impl FrameStats {
    pub fn skip(&mut self, why: ParseError) {
        self.skipped[why as usize] += 1;
    }

    pub fn skipped(&self, why: ParseError) -> u64 {
        self.skipped[why as usize]
    }

    /// Non-zero skip counts as `(reason, count)`, in a stable order.
    pub fn skipped_by_reason(&self) -> impl Iterator<Item = (ParseError, u64)> + '_ {
        ParseError::ALL
            .iter()
            .map(|&r| (r, self.skipped(r)))
            .filter(|&(_, n)| n > 0)
    }

    pub fn merge(&mut self, o: &FrameStats) {
        self.frames += o.frames;
        self.tracked += o.tracked;
        self.duplicate += o.duplicate;
        self.unsupported_link += o.unsupported_link;
        for (a, b) in self.skipped.iter_mut().zip(o.skipped.iter()) {
            *a += b;
        }
    }
}
