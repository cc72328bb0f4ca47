"""The README opens with the two set-up commands, and CI runs the second one verbatim."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    cmds = setup_commands()
    assert len(cmds) == 2
    assert "bench run --optim adamw_bnb_8bit" in cmds[0]
    assert "pytest" in cmds[1]
    # LoRA/QLoRA (peft, bitsandbytes) is part of what the first command installs, and of what CI tests
    assert all("peft" in c.split("'")[1] for c in cmds)
    head = (ROOT / "README.md").read_text().split("```bash", 1)[0]
    assert head.strip() == "# optimem"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci
