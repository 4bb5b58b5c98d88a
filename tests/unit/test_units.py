import pytest

from aiia_ops.model.units import Duration, Size, UnitError


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MB", 64 * 1024**2),
        ("2.6MB", round(2.6 * 1024**2)),
        ("32KB", 32 * 1024),
        ("20GB", 20 * 1024**3),
        ("512m", 512 * 1024**2),
        ("100", 100),
        ("10MiB", 10 * 1024**2),
    ],
)
def test_sizes_parse_as_binary_units(text, size):
    assert Size.parse(text).bytes == size


@pytest.mark.parametrize("text", ["12XB", "MB", "-5MB", "", "1.2.3MB"])
def test_unparsable_sizes_say_what_is_expected(text):
    with pytest.raises(UnitError, match=r"expected a size such as 64MB \(units B, KB, MB, GB\)"):
        Size.parse(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("500ms", 0.5),
        ("30d", 30 * 86400),
        ("1h", 3600),
    ],
)
def test_durations(text, seconds):
    assert Duration.parse(text).seconds == seconds


def test_sizes_and_durations_print_back_as_written():
    assert str(Size.parse("64MB")) == "64MB"
    assert str(Size.parse("2.5MB")) == "2.5MB"
    assert str(Duration.parse("30d")) == "30d"
    assert str(Duration.parse("500ms")) == "500ms"


def test_plain_numbers_are_not_durations():
    with pytest.raises(UnitError, match="expected a duration such as 30s"):
        Duration.parse(30)
