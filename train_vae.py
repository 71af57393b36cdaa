from ldm.cli.train_vae import main

if __name__ == "__main__":
    raise SystemExit(main())
