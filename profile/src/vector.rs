//! The interest vector of semantics §5.

/// A user's interest vector and how many history items had features.
#[derive(Debug, Clone, PartialEq)]
pub struct InterestVector {
    pub vector: Vec<f32>,
    pub known_items: u32,
}

/// Computes the interest vector of a kept history, given each item's features in history order
/// (oldest first; `None` for an unknown item).
///
/// The item at distance k from the newest weighs `decay^k`; unknown items keep their position but
/// add nothing. Sums run in f64 from the newest item to the oldest, a fixed order, so every
/// worker count and every replay gives the same bits.
pub fn interest_vector<'a, I>(
    features_in_history_order: I,
    dim: usize,
    decay: f64,
) -> InterestVector
where
    I: IntoIterator<Item = Option<&'a [f32]>>,
    I::IntoIter: DoubleEndedIterator,
{
    let mut sum = vec![0f64; dim];
    let mut total_weight = 0f64;
    let mut weight = 1f64;
    let mut known_items = 0u32;
    for features in features_in_history_order.into_iter().rev() {
        if let Some(features) = features {
            for (acc, &x) in sum.iter_mut().zip(features) {
                *acc += weight * f64::from(x);
            }
            total_weight += weight;
            known_items += 1;
        }
        weight *= decay;
    }
    let vector = if known_items == 0 {
        vec![0f32; dim]
    } else {
        sum.iter().map(|s| (s / total_weight) as f32).collect()
    };
    InterestVector {
        vector,
        known_items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighs_by_distance_from_the_newest_and_skips_unknown_items() {
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 1.0];
        // history: a (k=2), unknown (k=1), b (k=0)
        let v = interest_vector([Some(&a[..]), None, Some(&b[..])], 2, 0.5);
        assert_eq!(v.known_items, 2);
        let (wa, wb) = (0.25, 1.0);
        assert!((v.vector[0] as f64 - wa / (wa + wb)).abs() < 1e-7);
        assert!((v.vector[1] as f64 - wb / (wa + wb)).abs() < 1e-7);
    }

    #[test]
    fn no_known_item_gives_zeros() {
        let v = interest_vector([None, None], 3, 0.9);
        assert_eq!(
            v,
            InterestVector {
                vector: vec![0.0; 3],
                known_items: 0
            }
        );
        let empty: [Option<&[f32]>; 0] = [];
        assert_eq!(interest_vector(empty, 2, 0.9).vector, vec![0.0, 0.0]);
    }

    #[test]
    fn a_single_known_item_is_its_own_features() {
        let x = [0.25f32, -0.5, 3.0];
        let v = interest_vector([None, Some(&x[..]), None, None], 3, 0.9);
        assert_eq!(v.vector, x.to_vec());
        assert_eq!(v.known_items, 1);
    }
}
