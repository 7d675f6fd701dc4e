"""``python -m api.cli``: the ``vmtask`` command (messages still name it "vmtask")."""

from api.cli.main import main

if __name__ == "__main__":
    main()
