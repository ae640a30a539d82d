from propeller.cli import main

main()
