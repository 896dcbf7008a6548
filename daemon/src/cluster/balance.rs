//! How many channels each live node should run: an even split, capped by each node's
//! `node.max_channels`, decided the same way on every node from the same inputs (the
//! live nodes by id, the runnable channel count), so the shares add up without talk.

/// Each node's share of `channels`, in the order of `caps` (the live nodes sorted by
/// id; `None` is no cap). Shares differ by at most one between uncapped nodes; what a
/// capped node cannot take goes to the others; channels beyond every cap get no node.
pub fn shares(caps: &[Option<u64>], channels: u64) -> Vec<u64> {
    let mut share = vec![0u64; caps.len()];
    let mut left = channels;
    // Water-filling: hand out rounds of an even split among the nodes with room.
    loop {
        let open: Vec<usize> = (0..caps.len())
            .filter(|&i| caps[i].is_none_or(|c| share[i] < c))
            .collect();
        if open.is_empty() || left == 0 {
            return share;
        }
        let each = left / open.len() as u64;
        let mut extra = left % open.len() as u64;
        for &i in &open {
            let room = caps[i].map_or(u64::MAX, |c| c - share[i]);
            let want = each + u64::from(extra > 0);
            let got = want.min(room);
            if got == want && extra > 0 {
                extra -= 1;
            }
            share[i] += got;
            left -= got;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shares;

    #[test]
    fn an_even_split_differs_by_at_most_one_and_adds_up() {
        assert_eq!(shares(&[None; 4], 30), vec![8, 8, 7, 7]);
        assert_eq!(shares(&[None; 3], 30), vec![10, 10, 10]);
        assert_eq!(shares(&[None], 5), vec![5]);
        assert_eq!(shares(&[], 5), Vec::<u64>::new());
        assert_eq!(shares(&[None; 3], 0), vec![0, 0, 0]);
    }

    #[test]
    fn a_capped_node_leaves_the_rest_to_the_others() {
        assert_eq!(shares(&[Some(2), None, None], 30), vec![2, 14, 14]);
        assert_eq!(
            shares(&[Some(2), Some(3)], 30),
            vec![2, 3],
            "beyond every cap"
        );
        assert_eq!(shares(&[Some(20), None], 9), vec![5, 4]);
    }
}
