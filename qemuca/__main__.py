from qemuca.cli import main

main()
