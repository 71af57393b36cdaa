from ldm.cli.train_unet import main

if __name__ == "__main__":
    raise SystemExit(main())
