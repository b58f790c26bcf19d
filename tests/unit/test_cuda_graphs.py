from kiln.engine.cuda_graphs import batch_buckets


def test_batch_buckets_cover_every_size_up_to_the_max():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    buckets = batch_buckets(256)
    assert buckets[-1] == 256 and len(buckets) == 4 + 15 + 1
    for n in range(1, 257):  # every batch size has a bucket at most 16 above it
        assert 0 <= min(b for b in buckets if b >= n) - n < 16


def test_token_buckets_are_powers_of_two_from_16_and_the_max():
    from kiln.engine.cuda_graphs import token_buckets

    assert token_buckets(2) == [2]
    assert token_buckets(16) == [16]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(512) == [16, 32, 64, 128, 256, 512]


def test_a_step_runs_in_the_smallest_captured_bucket_that_holds_it():
    from kiln.engine.cuda_graphs import smallest_bucket

    buckets = [1, 2, 4, 8, 16]
    assert [smallest_bucket(buckets, set(buckets), n) for n in (1, 3, 8, 9, 16)] == [1, 4, 8, 16, 16]
    assert smallest_bucket(buckets, set(buckets), 17) is None  # larger than every bucket: eager
    assert smallest_bucket(buckets, {1, 2, 16}, 3) is None  # its bucket was not captured: eager


def test_mixed_buckets_are_fine_grained_past_128_tokens():
    from kiln.engine.piecewise_graphs import mixed_buckets

    assert mixed_buckets(16) == [16]
    assert mixed_buckets(100) == [16, 32, 64, 100]
    assert mixed_buckets(256) == [16, 32, 64, 128, 192, 256]
    assert mixed_buckets(300) == [16, 32, 64, 128, 192, 256, 300]
    assert mixed_buckets(1024)[-3:] == [896, 960, 1024]
