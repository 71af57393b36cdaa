from ldm.cli.train_control import main

if __name__ == "__main__":
    raise SystemExit(main())
