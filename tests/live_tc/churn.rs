//! Short connections on reused 5-tuples, each counted once with its bytes
//! (`tests/common/churn.rs`).

use crate::common::churn::churn;
use crate::common::root::enabled;

/// A port that comes back before the connection that used it last has
/// left the kernel table starts a connection of its own: every connection
/// made is in the final output and in the export once, with its bytes.
#[test]
fn reused_5_tuples_are_counted_once_each() {
    if !enabled("live_tc") {
        return;
    }
    churn("tc", "tc");
}
