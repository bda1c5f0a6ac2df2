import pytest

from vattnd.units import format_size, parse_size


@pytest.mark.parametrize("text,value", [
    ("4GiB", 4 << 30), ("2MiB", 2 << 20), ("64KiB", 64 << 10), ("1G", 1 << 30), ("512m", 512 << 20),
    ("1GB", 10**9), ("65536", 65536), (" 1.5 GiB ", 3 << 29),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "4 gibibytes", "-1GiB", "1e9"])
def test_parse_size_rejects_garbage_with_a_hint(text):
    with pytest.raises(ValueError, match="write e.g."):
        parse_size(text)


def test_format_size():
    assert format_size(2 << 20) == "2 MiB"
    assert format_size(3 << 29) == "1.5 GiB"
    assert format_size(100) == "100 B"
