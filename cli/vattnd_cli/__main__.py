from vattnd_cli.main import main

main()
