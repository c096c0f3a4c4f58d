from kvslim.cli import main

main()
