import pytest

from serving.cli import main


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-running-requests", "0"], "--max-running-requests must be >= 1"),
        (["--timeout-graceful-shutdown", "-1"], "--timeout-graceful-shutdown must be >= 0"),
        (["--timeout-graceful-shutdown", "nan"], "--timeout-graceful-shutdown must be >= 0"),
        (["--speculative-algorithm", "MEDUSA"], "--speculative-algorithm must be EAGLE3"),
        (["--context-length", "1"], "--context-length must be >= 2"),
    ],
)
def test_bad_server_settings_are_named_before_anything_loads(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
